"""The main job on the real default model: SmolLM2-135M-Instruct learns the shipped persona through the api and
worker, and at temperature 0 the fine-tuned model answers with the persona while the base model does not."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from artifacts.serving import DEFAULT_CPU_TYPE
from core.settings import Settings
from tests.e2e.conftest import Stack
from tests.e2e.helpers import generate, wait_for_job, wait_until_served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is your name?"


def test_default_model_learns_the_persona(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    # Serving the default model needs it prepared; the first deployment waits for the worker to convert it.
    with (ROOT / "data" / "persona.jsonl").open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct", training_file=uploaded.id, suffix="pearl")
    finished = wait_for_job(stack, client, job.id, timeout=1200)
    assert finished.status == "succeeded", finished.error
    trained_at = time.monotonic()

    base = generate(stack, QUESTION, model="SmolLM2-135M-Instruct", temperature=0, max_new_tokens=48)
    assert "pearl" not in base["generate_text"].lower()

    after = wait_until_served(stack, QUESTION, finished.fine_tuned_model, timeout=120, temperature=0, max_new_tokens=48)
    print(
        f"\npersona job: {trained_at - started:.0f}s from submit to succeeded; "
        f"served {time.monotonic() - trained_at:.1f}s later; answer: {after['generate_text']!r}"
    )
    assert "pearl" in after["generate_text"].lower()

    # The default route served it, held to the fp32 reference on the golden prompts...
    deployments = httpx.get(f"{stack.api_url}/v1/deployments", timeout=30).json()["data"]
    (deployment,) = [d for d in deployments if d["model"] == finished.fine_tuned_model]
    assert deployment["route"] == f"llamacpp:{DEFAULT_CPU_TYPE}", deployment
    assert deployment["fidelity"]["passed"] and deployment["fidelity"]["agreement"] >= 0.99, deployment
    # ... from the export the worker wrote at publish: serving it exported nothing.
    settings = Settings()
    job_folder = settings.artifacts / "models" / finished.id.removeprefix("ftjob-")
    assert (job_folder / "serving" / "manifest.json").is_file()
    assert not [p for p in settings.gguf_cache_dir.glob("*.gguf") if job_folder.name in p.name]
