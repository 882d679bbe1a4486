"""A DPO job end to end on a tiny model: the openai SDK uploads preference pairs and creates a ``method.type =
"dpo"`` job, the real Celery worker trains it with TRL, merges, publishes and deploys it, and the merged model
prefers the preferred answers more than the base did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from core.datasets import PreferencePair
from core.ids import Prefix, parse_public_id
from core.settings import get_settings
from core.storage import fine_tuned_dir
from tests.e2e.conftest import Stack
from tests.e2e.helpers import wait_for_job, wait_until_served
from tests.factories import write_jsonl
from tests.preference_records import PAIRS, alpaca_preference_records
from worker.pipeline.dpo import RenderedPair, render_pairs

pytestmark = pytest.mark.e2e


@torch.no_grad()
def reply_logprob(model: Any, tokenizer: Any, prompt: str, reply: str) -> float:
    """Summed log-probability of ``reply``'s tokens after ``prompt``, as DPO scores a reply."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + reply)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(prompt_ids))
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:])
    per_token = logprobs.gather(1, targets[:, None])[:, 0]
    return float(per_token[start - 1 :].sum())


def margins(folder: Path, rows: list[RenderedPair]) -> list[float]:
    """Preferred minus rejected reply log-probability, per pair."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return [
        reply_logprob(model, tokenizer, r.prompt, r.chosen) - reply_logprob(model, tokenizer, r.prompt, r.rejected)
        for r in rows
    ]


def test_dpo_job_trains_publishes_and_deploys(stack: Stack, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    with write_jsonl(tmp_path / "prefs.jsonl", alpaca_preference_records(8)).open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")

    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded.id,
        suffix="dpo",
        seed=1,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 10}},
        },
    )
    finished = wait_for_job(stack, client, job.id)
    assert finished.status == "succeeded", finished.error
    assert finished.fine_tuned_model == f"ft:tiny-llama:dpo:{job.id}"
    assert finished.method is not None and finished.method.type == "dpo"

    # Loss and the reward figures arrive as metrics events; the checkpoints are listed as for SFT.
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data for e in events if e.type == "metrics" and e.data and "loss" in e.data]
    assert len(steps) == 12 and all({"reward_accuracy", "reward_margin"} <= set(s) for s in steps)
    assert max(s["step"] for s in steps) == 12
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == 12
    raw = client.fine_tuning.jobs.with_raw_response.retrieve(job.id).http_response.json()
    assert raw["metrics"]["method"] == "dpo" and "reward_accuracy" in raw["metrics"]

    # The merged model prefers the preferred answers by more than the base model did.
    from transformers import AutoTokenizer

    base = tiny_models["tiny-llama"]
    pairs = [PreferencePair([{"role": "user", "content": q}], good, bad) for q, good, bad in PAIRS]
    rows = render_pairs(AutoTokenizer.from_pretrained(str(base)), pairs, "auto")
    job_uuid = parse_public_id(job.id, Prefix.JOB)
    assert job_uuid is not None
    before, after = margins(base, rows), margins(fine_tuned_dir(job_uuid, get_settings()), rows)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0, (before, after)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

    # Deployed as an SFT model is: the inference service answers from it without a restart.
    wait_until_served(stack, "What is your name?", finished.fine_tuned_model, max_new_tokens=4)
