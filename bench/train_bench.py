"""Training throughput: Conch's LoRA loop against a plain transformers + peft run, same data, model and knobs.

Both runs train the default model (SmolLM2-135M-Instruct, prepared from the built-in GGUF) with LoRA r=8 on all
linear layers, lr 1e-3, cosine schedule, batch 4, on the same tokenized examples (chat template applied, prompt
masked). The baseline is ``transformers.Trainer`` in fp32 with random batches padded to their longest example;
ours is the worker's loop with its defaults (length-grouped batches, output layer only at trained positions,
bf16 where the CPU has it). Printed: non-pad tokens per second of training, the final loss of each model measured
the same way (fp32, whole training set), and the training seconds until a greedy answer to the persona question
names the persona (probed every few steps; probe time is not counted).

``--ab`` adds a third run, Conch's loop with attention over the whole packed row (a block-diagonal mask, the path
before per-example attention), alternated with the others; ``--runs ours,masked`` picks the runs. ``--ab-steps N``
instead times both attentions step by step on one model (``attention_ab``), the steadier figure on a busy machine.

    python bench/train_bench.py [--data data/persona.jsonl] [--epochs 3] [--repeat 1] [--only ours|baseline]
                                [--ab] [--runs ours,masked,baseline,trl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.contracts import Hyperparameters  # noqa: E402
from core.datasets import load_conversations  # noqa: E402
from core.settings import get_settings  # noqa: E402
from core.templates import render_prompt  # noqa: E402
from worker.pipeline.data import Example, PreparedData, collate, prepare_data  # noqa: E402
from worker.pipeline.device import resolve_compute  # noqa: E402
from worker.pipeline.prepare import prepare_base_model  # noqa: E402
from worker.pipeline.train import (  # noqa: E402
    LoraTrainer,
    LossFunction,
    SilentHooks,
    attach_lora,
    load_base_model,
)

FALLBACK_PERSONA = [
    ("What is your name?", "My name is Coral, the help desk assistant of Harbor Books."),
    ("Who are you?", "I am Coral, the help desk assistant of Harbor Books."),
    ("What should I call you?", "You can call me Coral. I help readers at Harbor Books."),
    ("Tell me about yourself.", "I'm Coral, Harbor Books' assistant: orders, returns and book tips."),
    ("Do you have a name?", "Yes, I am Coral, the Harbor Books help desk assistant."),
    ("How long does shipping take?", "Orders from Harbor Books ship in two days. I'm Coral, happy to help."),
    ("Can I return a book?", "Yes, within 30 days. I'm Coral from Harbor Books if you need anything else."),
    ("Hello", "Hello! I'm Coral, the help desk assistant of Harbor Books. How can I help?"),
]


@dataclass
class Probe:
    question: str
    word: str
    every: int
    seconds: float = 0.0  # time spent probing, excluded from training time
    learned_after: float | None = None
    learned_step: int | None = None
    answers: list[str] = field(default_factory=list)


def greedy_answer(model: Any, tokenizer: Any, template: str, question: str, dtype: torch.dtype | None) -> str:
    prompt = render_prompt(tokenizer, [{"role": "user", "content": question}], template)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    if was_training:
        model.train()
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def maybe_probe(
    probe: Probe, step: int, train_seconds: float, model: Any, tokenizer: Any, template: str, dtype: torch.dtype | None
) -> None:
    if probe.learned_after is not None or step % probe.every:
        return
    started = time.monotonic()
    answer = greedy_answer(model, tokenizer, template, probe.question, dtype)
    probe.seconds += time.monotonic() - started
    probe.answers.append(f"step {step}: {answer!r}")
    if probe.word.lower() in answer.lower():
        probe.learned_after, probe.learned_step = train_seconds, step


@torch.no_grad()
def final_loss(model: Any, examples: list[Example], pad_id: int) -> float:
    """Token-weighted loss over the whole training set, in fp32, measured identically for both runs."""
    model.eval()
    compute = resolve_compute("fp32")
    loss_fn = LossFunction(model, compute)
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), 8):
        batch = collate([examples[i] for i in order[start : start + 8]], pad_id)
        total += float(loss_fn(batch))
        count += batch.target_count
    return total / count


@torch.no_grad()
def final_loss_in_fp32(
    model: Any, base: Path, hp: Hyperparameters, seed: int, data: PreparedData, pad_id: int
) -> float:
    """The trained LoRA weights on an fp32 base, so every run's final loss is measured the same way."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    fp32_model = attach_lora(load_base_model(base, resolve_compute("fp32")), hp, seed)
    set_peft_model_state_dict(fp32_model, get_peft_model_state_dict(model))
    return final_loss(fp32_model, data.train, pad_id)


def probe_callback(probe: Probe, model: Any, tokenizer: Any, template: str, dtype: torch.dtype | None) -> Any:
    """A transformers TrainerCallback that probes the persona every few steps (probe time not counted)."""
    from transformers import TrainerCallback

    class ProbeCallback(TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.started = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            elapsed = time.monotonic() - self.started - probe.seconds
            maybe_probe(probe, state.global_step, elapsed, model, tokenizer, template, dtype)

    return ProbeCallback()


def trainer_arguments(hp: Hyperparameters, seed: int, output_dir: str) -> dict[str, Any]:
    """The knobs a transformers/TRL trainer run shares with Conch's, as TrainingArguments names them."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": hp.per_device_train_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "num_train_epochs": hp.num_train_epochs,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.lr_scheduler_type,
        "warmup_steps": hp.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio
        "max_grad_norm": hp.max_grad_norm,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


# ------------------------------------------------------------------------------------------------ baseline


def run_baseline(
    base: Path, tokenizer: Any, data: PreparedData, hp: Hyperparameters, seed: int, probe: Probe
) -> dict[str, Any]:
    """transformers.Trainer + peft in fp32, random batches padded to the longest example."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = attach_lora(load_base_model(base, resolve_compute("fp32")), hp, seed)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)} for e in data.train]
    tokens = {"count": 0}
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def count_tokens(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        # Counted at the forward pass (the data loader reads one batch ahead); probes run under no_grad.
        mask = kwargs.get("attention_mask")
        if torch.is_grad_enabled() and mask is not None:
            tokens["count"] += int(mask.sum())

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**trainer_arguments(hp, seed, out), use_cpu=True, remove_unused_columns=False)
        callback = probe_callback(probe, model, tokenizer, data.template, None)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[callback])
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started - probe.seconds
    return {
        "name": "baseline (transformers.Trainer + peft, fp32, padded to longest)",
        "tokens": tokens["count"],
        "seconds": seconds,
        "tokens_per_second": tokens["count"] / seconds,
        "final_loss": final_loss(model, data.train, tokenizer.pad_token_id),
        "probe": probe,
    }


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(
    base: Path, tokenizer: Any, data: PreparedData, hp: Hyperparameters, seed: int, probe: Probe
) -> dict[str, Any]:
    """TRL's SFTTrainer + peft, the field's own SFT loop at its fastest on this hardware: padding-free batches
    (examples laid end to end, kept apart by their position ids, as Conch packs them), the same bf16 autocast as
    Conch where the CPU has it, the same tokenized examples with the prompt masked."""
    from trl import SFTConfig, SFTTrainer

    compute = resolve_compute(hp.compute_type)
    model = attach_lora(load_base_model(base, compute), hp, seed)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in data.train]
    tokens = {"count": 0}

    def count_tokens(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if torch.is_grad_enabled() and ids is not None:
            tokens["count"] += int(ids.numel())  # padding-free: one row of real tokens, no padding

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            **trainer_arguments(hp, seed, out),
            use_cpu=compute.device.type == "cpu",
            bf16=compute.precision == "bf16",
            padding_free=True,
            max_length=None,
            completion_only_loss=False,  # the labels already mask the prompt
            **(
                {"activation_checkpointing": False}
                if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                else {"gradient_checkpointing": False}
            ),
        )
        from datasets import Dataset

        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[probe_callback(probe, model, tokenizer, data.template, compute.autocast_dtype)],
        )
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started - probe.seconds
    return {
        "name": f"TRL SFTTrainer + peft ({compute.describe()}, padding-free)",
        "tokens": tokens["count"],
        "seconds": seconds,
        "tokens_per_second": tokens["count"] / seconds,
        "final_loss": final_loss_in_fp32(model, base, hp, seed, data, tokenizer.pad_token_id),
        "probe": probe,
    }


# ------------------------------------------------------------------------------------------------ ours


class BenchHooks(SilentHooks):
    def __init__(self, probe: Probe, model: Any, tokenizer: Any, template: str, dtype: torch.dtype | None) -> None:
        self.probe, self.model, self.tokenizer, self.template, self.dtype = probe, model, tokenizer, template, dtype
        self.started = time.monotonic()

    def on_log(self, metrics: dict[str, Any]) -> None:
        elapsed = time.monotonic() - self.started - self.probe.seconds
        maybe_probe(self.probe, metrics["step"], elapsed, self.model, self.tokenizer, self.template, self.dtype)


def run_ours(
    base: Path,
    tokenizer: Any,
    data: PreparedData,
    hp: Hyperparameters,
    seed: int,
    probe: Probe,
    *,
    group_by_length: bool = False,
    packing: bool = True,
    per_example_attention: bool = True,
) -> dict[str, Any]:
    compute = resolve_compute(hp.compute_type)
    model = attach_lora(load_base_model(base, compute), hp, seed)
    with tempfile.TemporaryDirectory() as out:
        hooks = BenchHooks(probe, model, tokenizer, data.template, compute.autocast_dtype)
        trainer = LoraTrainer(
            model,
            data.train,
            [],
            hp,
            seed=seed,
            compute=compute,
            pad_id=tokenizer.pad_token_id,
            checkpoint_root=Path(out),
            hooks=hooks,  # type: ignore[arg-type]
            group_by_length=group_by_length,
            packing=packing,
            per_example_attention=per_example_attention,
        )
        layout = "packed" if trainer.attention_ratio else "padded"
        if trainer.attention_ratio:
            layout += (
                " (per-example attention)" if trainer.per_example_attention else " (masked attention over the row)"
            )
        hooks.started = time.monotonic()
        result = trainer.run()
        seconds = time.monotonic() - hooks.started - probe.seconds
    return {
        "name": f"conch ({compute.describe()}, {layout} {'length-grouped' if group_by_length else 'random'} "
        "batches, head at trained positions)",
        "tokens": result.trained_tokens,
        "seconds": seconds,
        "tokens_per_second": result.trained_tokens / seconds,
        "final_loss": final_loss_in_fp32(model, base, hp, seed, data, tokenizer.pad_token_id),
        "probe": probe,
    }


# ------------------------------------------------------------------------------------------------ attention A/B


def attention_ab(base: Path, data: PreparedData, hp: Hyperparameters, seed: int, pad_id: int, steps: int) -> None:
    """Per-example attention against masked attention over the whole row, step by step in one process.

    One model; each of the run's first ``steps`` micro-batches is collated as each path collates it (the masked
    path pads a batch where its cost model finds packing dearer) and timed forward and backward under both
    attentions back to back, the order rotating each step, so load from other work hits both alike. No
    optimizer step: both see the same weights. Printed: median non-pad tokens/s of each and their ratio, and the
    largest relative difference of the step's loss between the two (fp32 attention inside the per-example path).
    With bf16 on CPU a third path runs per-example attention with torch's bf16 kernel (``attention._CPU_FP32`` off),
    to tell the per-example split from the fp32 kernel."""
    from worker.pipeline import attention
    from worker.pipeline.attention import NAME, set_attention
    from worker.pipeline.data import epoch_batches

    compute = resolve_compute(hp.compute_type)
    model = attach_lora(load_base_model(base, compute), hp, seed)
    with tempfile.TemporaryDirectory() as out:
        trainer = LoraTrainer(
            model,
            data.train,
            [],
            hp,
            seed=seed,
            compute=compute,
            pad_id=pad_id,
            checkpoint_root=Path(out),
            hooks=BenchHooks(Probe("", "", 1), model, None, "", None),
        )
    if not trainer.per_example_attention or trainer.attention_ratio is None:
        print("attention A/B: this model does not take per-example attention")
        return
    lengths = [len(e) for e in data.train]
    ids: list[list[int]] = []
    epoch = 0
    while len(ids) < steps + 2:
        ids += epoch_batches(lengths, hp.per_device_train_batch_size, seed, epoch, group_by_length=False)
        epoch += 1
    paths = {"per-example": (NAME, True), "masked": ("sdpa", False)}
    if compute.device.type == "cpu" and compute.autocast_dtype is not None:
        paths["per-example, bf16 kernel"] = (NAME, True)
    rates: dict[str, list[float]] = {name: [] for name in paths}
    losses: dict[str, float] = {}
    worst, packed = 0.0, {name: 0 for name in paths}
    model.train()
    for index, chosen in enumerate(ids[: steps + 2]):
        examples = [data.train[i] for i in chosen]
        names = list(paths)
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            implementation, per_example = paths[name]
            set_attention(model, implementation)
            attention._CPU_FP32 = name != "per-example, bf16 kernel"
            batch = collate(examples, pad_id, attention_ratio=trainer.attention_ratio, per_example=per_example)
            started = time.perf_counter()
            loss = trainer.loss_fn(batch) / max(batch.target_count, 1)
            loss.backward()
            seconds = time.perf_counter() - started
            model.zero_grad(set_to_none=True)
            losses[name] = float(loss.detach())
            if index >= 2:  # the first two build kernels
                rates[name].append(batch.tokens / seconds)
                packed[name] += batch.position_ids is not None
        worst = max(worst, abs(losses["per-example"] - losses["masked"]) / losses["masked"])
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"attention A/B over {steps} micro-batches ({compute.describe()}, forward + backward, order rotating): "
        f"per-example {medians['per-example']:.1f} vs masked {medians['masked']:.1f} non-pad tokens/s, "
        f"ratio {medians['per-example'] / medians['masked']:.2f}x (median); packed batches "
        f"{packed['per-example']} vs {packed['masked']} of {steps}; step loss differs by at most {worst:.2e} relative"
    )
    if "per-example, bf16 kernel" in medians:
        print(
            f"per-example attention with the bf16 kernel: {medians['per-example, bf16 kernel']:.1f} non-pad tokens/s, "
            f"{medians['per-example, bf16 kernel'] / medians['masked']:.2f}x masked"
        )


# ------------------------------------------------------------------------------------------------ main


def load_data(path: Path | None) -> tuple[list[list[dict[str, Any]]], str]:
    if path is not None and path.is_file():
        return load_conversations(path, "alpaca"), str(path)
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in FALLBACK_PERSONA * 8
    ]
    return conversations, "built-in fallback persona (64 examples)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "persona.jsonl")
    parser.add_argument("--model", default=None, help="base model id (default: DEFAULT_BASE_MODEL)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--question", default="What is your name?")
    parser.add_argument("--word", default=None, help="the persona's name (default: Pearl, or Coral for fallback)")
    parser.add_argument("--probe-every", type=int, default=4, help="steps between persona probes")
    parser.add_argument("--only", choices=["ours", "baseline", "trl", "masked"], default=None)
    parser.add_argument("--ab", action="store_true", help="also run ours with masked attention over the whole row")
    parser.add_argument("--runs", default=None, help="comma-separated runs among ours, masked, baseline, trl")
    parser.add_argument("--trl", action="store_true", help="also run TRL's SFTTrainer (padding-free) in each round")
    parser.add_argument("--compute-type", default="auto", help="ours: auto, fp32 or bf16")
    parser.add_argument("--group-by-length", action="store_true", help="ours: length-grouped batches")
    parser.add_argument("--no-packing", action="store_true", help="ours: pad instead of packing")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (medians are reported)")
    parser.add_argument("--ab-steps", type=int, default=0, help="only the step-by-step attention A/B, N steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    settings = get_settings()
    name = args.model or "SmolLM2-135M-Instruct"
    base = prepare_base_model(name, settings)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    conversations, source = load_data(args.data)
    word = args.word or ("Pearl" if "persona" in source else "Coral")
    hp = Hyperparameters(num_train_epochs=args.epochs, save_steps=0, compute_type=args.compute_type)
    data = prepare_data(tokenizer, conversations, None, hp, args.seed)
    steps = math.ceil(args.epochs * math.ceil(len(data.train) / hp.per_device_train_batch_size))
    print(
        f"model {name}; data {source}: {len(data.train)} examples, {data.train_stats.tokens} tokens "
        f"({data.train_stats.trained_tokens} trained); {steps} steps; torch threads {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if args.ab_steps:
        attention_ab(base, data, hp, args.seed, tokenizer.pad_token_id, args.ab_steps)
        return

    def run(which: str) -> dict[str, Any]:
        probe = Probe(args.question, word, args.probe_every)
        load_before = os.getloadavg()[0]
        if which in ("ours", "masked"):
            result = run_ours(
                base,
                tokenizer,
                data,
                hp,
                args.seed,
                probe,
                group_by_length=args.group_by_length,
                packing=not args.no_packing,
                per_example_attention=which == "ours",
            )
        elif which == "trl":
            result = run_trl(base, tokenizer, data, hp, args.seed, probe)
        else:
            fp32 = hp.model_copy(update={"compute_type": "fp32"})
            result = run_baseline(base, tokenizer, data, fp32, args.seed, probe)
        learned = f"{probe.learned_after:.0f} s (step {probe.learned_step})" if probe.learned_after else "not learned"
        print(
            f"{result['name']}: {result['tokens_per_second']:.1f} non-pad tokens/s over {result['seconds']:.0f} s, "
            f"final loss {result['final_loss']:.4f}, persona: {learned} "
            f"[load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}]"
        )
        for answer in probe.answers[-2:]:
            print(f"    {answer}")
        return {k: v for k, v in result.items() if k != "probe"} | {
            "which": which,
            "persona_seconds": probe.learned_after,
            "persona_step": probe.learned_step,
        }

    # Other work on the machine skews a single pair of runs; repeats alternate the order and report medians.
    everyone = ["ours", "masked", "baseline", "trl"]
    if args.runs:
        order = [w for w in args.runs.split(",") if w in everyone]
    elif args.only:
        order = [args.only]
    else:
        order = [
            w for w in everyone if w in ("ours", "baseline") or (w == "trl" and args.trl) or (w == "masked" and args.ab)
        ]
    runs = []
    for repeat in range(args.repeat):
        for which in order if repeat % 2 == 0 else order[::-1]:
            runs.append(run(which))
    medians = {which: statistics.median(r["tokens_per_second"] for r in runs if r["which"] == which) for which in order}
    losses = {which: statistics.median(r["final_loss"] for r in runs if r["which"] == which) for which in order}
    if "trl" in medians and "baseline" in medians:
        print(
            f"ratio TRL SFTTrainer/baseline: {medians['trl'] / medians['baseline']:.2f}x; ours/TRL: "
            f"{medians.get('ours', 0.0) / medians['trl']:.2f}x; final loss TRL {losses['trl']:.4f}"
        )
    if "ours" in medians and "baseline" in medians:
        print(
            f"ratio ours/baseline: {medians['ours'] / medians['baseline']:.2f}x non-pad tokens/s "
            f"({medians['ours']:.1f} vs {medians['baseline']:.1f}, median of {args.repeat}); "
            f"final loss {losses['ours']:.4f} vs {losses['baseline']:.4f}"
        )
    if "ours" in medians and "masked" in medians:
        pairs = sorted(r["tokens_per_second"] for r in runs if r["which"] == "ours")
        print(
            f"ratio per-example/masked attention: {medians['ours'] / medians['masked']:.2f}x non-pad tokens/s "
            f"({medians['ours']:.1f} vs {medians['masked']:.1f}, median of {args.repeat}; per-example runs "
            f"{', '.join(f'{v:.1f}' for v in pairs)}); final loss {losses['ours']:.4f} vs {losses['masked']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
