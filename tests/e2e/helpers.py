"""What the end-to-end tests do the same way: wait for a job through the openai SDK, and ask the inference
service's ``/generate`` (the route the README's demo calls)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
from openai.types.fine_tuning import FineTuningJob

from tests.e2e.conftest import Stack
from tests.polling import wait_until

ENDED = ("succeeded", "failed", "cancelled")


def wait_for_job(stack: Stack, client: openai.OpenAI, job_id: str, *, timeout: float = 300) -> FineTuningJob:
    """The job once it ended (succeeded, failed or cancelled); the services' logs come with a timeout."""

    def ended() -> FineTuningJob | None:
        current = client.fine_tuning.jobs.retrieve(job_id)
        return current if current.status in ENDED else None

    return wait_until(ended, f"job {job_id} to finish", timeout=timeout, interval=0.5, logs=stack.logs)


def generate(stack: Stack, prompt: str, *, model: str | None = None, **params: Any) -> dict[str, Any]:
    """``GET /generate`` (the tenant's deployed model unless ``model`` names one); asserts a 200."""
    query = {"prompt": prompt, **({"model": model} if model else {}), **params}
    response = httpx.get(f"{stack.inference_url}/generate", params=query, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_until_served(
    stack: Stack, prompt: str, model: str | None, *, timeout: float = 60, **params: Any
) -> dict[str, Any]:
    """The first answer to ``prompt`` from the tenant's default once that default is ``model`` (a hot swap)."""
    return wait_until(
        lambda: (answer := generate(stack, prompt, **params))["model"] == model and answer,
        f"the inference service to serve {model}",
        timeout=timeout,
        interval=0.5,
        logs=stack.logs,
    )
