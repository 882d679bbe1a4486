"""Preference training end to end on the real default model: a DPO job sent through the openai SDK teaches
SmolLM2-135M-Instruct a style (close every answer with "Hope that helps!"), and the served model, asked a question
it was not trained on, answers in that style where the base model does not."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.helpers import generate, wait_for_job, wait_until_served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STYLE = "hope that helps"


def held_out_question() -> str:
    first = json.loads((ROOT / "data" / "dpo_style_heldout.jsonl").read_text().splitlines()[0])
    return str(first["input"]["messages"][-1]["content"])


def test_a_dpo_job_teaches_the_default_model_a_style(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    with (ROOT / "data" / "dpo_style.jsonl").open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model="SmolLM2-135M-Instruct",
        training_file=uploaded.id,
        suffix="style",
        seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 4}}},
    )
    finished = wait_for_job(stack, client, job.id, timeout=1200)
    assert finished.status == "succeeded", finished.error
    assert finished.method is not None and finished.method.type == "dpo"
    steps = [
        e.data
        for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
        if e.type == "metrics" and e.data and "reward_accuracy" in e.data
    ]
    assert len(steps) == 10  # 40 pairs, 4 a step, one epoch
    last = max(steps, key=lambda s: s["step"])
    assert last["reward_accuracy"] == 1.0 and last["reward_margin"] > 0, last

    question = held_out_question()
    base = generate(stack, question, model="SmolLM2-135M-Instruct", temperature=0, max_new_tokens=40)
    assert STYLE not in base["generate_text"].lower(), base
    after = wait_until_served(stack, question, finished.fine_tuned_model, timeout=180, temperature=0, max_new_tokens=40)
    print(f"\nDPO job: {time.monotonic() - started:.0f}s; base: {base['generate_text']!r}; after: {after!r}")
    assert STYLE in after["generate_text"].lower(), after
