"""Preference training: how often the model prefers the preferred answer on held-out prompts, before and after DPO.

The default model (SmolLM2-135M-Instruct, already instruction-tuned: the "SFT model before DPO") is trained with
the worker's DPO recipe pieces (prompts rendered with its chat template, TRL's DPOTrainer on a LoRA adapter, the
reference being the same weights with the adapter disabled) on ``data/dpo_style.jsonl``: 40 pairs whose preferred
answer closes with a friendly sign-off and whose rejected answer is the same answer without it. The held-out set
(``data/dpo_style_heldout.jsonl``, 12 other prompts) is scored the way DPO scores a reply: a pair counts as chosen
when the summed log-probability of the preferred reply is above the rejected one's. Printed: the held-out (and
training) preference rate and mean log-probability margin before and after, the training seconds, and the CPU.

    python bench/dpo_bench.py [--epochs 2] [--beta 0.1] [--learning-rate 1e-3] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from core.contracts import Hyperparameters  # noqa: E402
from core.datasets import load_preference_pairs  # noqa: E402
from core.settings import get_settings  # noqa: E402
from worker.pipeline.device import resolve_compute  # noqa: E402
from worker.pipeline.dpo import RenderedPair, _trainer, make_callback, render_pairs  # noqa: E402
from worker.pipeline.prepare import prepare_base_model  # noqa: E402
from worker.pipeline.train import SilentHooks, load_base_model  # noqa: E402


class PrintingHooks(SilentHooks):
    """The training hooks of a run outside a job: never stops, prints each step's figures, keeps the last."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.last = metrics
        accuracy, margin = metrics.get("reward_accuracy", float("nan")), metrics.get("reward_margin", float("nan"))
        print(
            f"  step {metrics['step']}/{metrics['total_steps']}: loss {metrics['loss']:.4f}, reward accuracy "
            f"{accuracy:.2f}, margin {margin:.3f}",
            flush=True,
        )


@torch.no_grad()
def reply_logprob(model: Any, tokenizer: Any, prompt: str, reply: str) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + reply)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(prompt_ids))
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    per_token = logprobs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
    return float(per_token[start - 1 :].sum())


def preference(model: Any, tokenizer: Any, rows: list[RenderedPair]) -> tuple[float, float]:
    """Share of pairs whose preferred reply is the likelier one, and the mean log-probability margin."""
    was_training = model.training
    model.eval()
    margins = [
        reply_logprob(model, tokenizer, r.prompt, r.chosen) - reply_logprob(model, tokenizer, r.prompt, r.rejected)
        for r in rows
    ]
    model.train(was_training)
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "dpo_style.jsonl")
    parser.add_argument("--heldout", type=Path, default=ROOT / "data" / "dpo_style_heldout.jsonl")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--compute-type", default="auto")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    settings = get_settings()
    base_path = prepare_base_model(args.model, settings)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    rows = render_pairs(tokenizer, load_preference_pairs(args.data, "openai_preference"), "auto")
    heldout = render_pairs(tokenizer, load_preference_pairs(args.heldout, "openai_preference"), "auto")
    hp = Hyperparameters(
        method="dpo",
        beta=args.beta,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch,
        save_steps=0,
        compute_type=args.compute_type,
    )
    compute = resolve_compute(hp.compute_type)
    model = load_base_model(base_path, compute)
    before = preference(model, tokenizer, heldout), preference(model, tokenizer, rows)

    hooks = PrintingHooks()
    steps = max(1, round(args.epochs * -(-len(rows) // args.batch)))
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(
            model, tokenizer, rows, [], hp, compute, Path(out), args.seed, steps, make_callback(hooks, "bench", 0.0)
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        after = preference(trainer.model, tokenizer, heldout), preference(trainer.model, tokenizer, rows)

    print(
        f"model {args.model}; {len(rows)} training pairs, {len(heldout)} held out; DPO beta {args.beta:g}, lr "
        f"{args.learning_rate:g}, batch {args.batch}, {args.epochs:g} epochs ({trainer.state.global_step} steps) on "
        f"{compute.describe()}, {torch.get_num_threads()} threads; CPU {cpu_name()}"
    )
    print(f"training: {seconds:.1f} s; last step: {hooks.last}")
    print("                       preferred chosen   mean log-prob margin (preferred - rejected)")
    for name, (rate_before, margin_before), (rate_after, margin_after) in (
        ("held-out", before[0], after[0]),
        ("training", before[1], after[1]),
    ):
        print(
            f"  {name:9s} before DPO  {rate_before:6.1%}            {margin_before:+8.2f}\n"
            f"  {name:9s} after DPO   {rate_after:6.1%}            {margin_after:+8.2f}"
        )


if __name__ == "__main__":
    main()
