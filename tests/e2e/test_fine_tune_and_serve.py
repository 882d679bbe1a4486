"""End to end through the real api, Celery worker and inference processes: upload with the openai SDK, train,
merge, publish, hot-swap, and answer from the fine-tuned model without restarting anything."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.helpers import generate, wait_for_job, wait_until_served
from tests.factories import alpaca_records, write_jsonl

pytestmark = pytest.mark.e2e


def test_tiny_model_is_fine_tuned_and_hot_swapped(stack: Stack, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    dataset = write_jsonl(tmp_path / "train.jsonl", alpaca_records(16))
    with dataset.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")

    assert generate(stack, "What is your name?", max_new_tokens=8)["model"] == "tiny-llama"

    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded.id,
        suffix="e2e",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    finished = wait_for_job(stack, client, job.id)
    assert finished.status == "succeeded", finished.error
    assert finished.fine_tuned_model and finished.fine_tuned_model.startswith("ft:tiny-llama:")

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all("loss" in (e.data or {}) for e in metrics if (e.data or {}).get("step"))

    # The new model is served without restarting the inference process.
    wait_until_served(stack, "What is your name?", finished.fine_tuned_model, max_new_tokens=8)
    answer = httpx.get(f"{stack.inference_url}/generate", params={"prompt": "What is your name?"}, timeout=60)
    assert answer.headers["x-conch-model"] == finished.fine_tuned_model
    assert stack.inference.alive() and stack.worker.alive() and stack.api.alive()

    models = {m.id for m in client.models.list().data}
    assert {"tiny-llama", finished.fine_tuned_model} <= models
