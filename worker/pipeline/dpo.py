"""The DPO recipe: preference pairs -> the start model's chat template -> TRL's DPOTrainer on a LoRA adapter ->
the merge and publish tail every method shares.

TRL computes the DPO loss; the reference policy is the same model with the adapter disabled (TRL does that when it
wraps the model with the LoRA config itself), so no second copy of the weights is loaded. The job plumbing stays
Conch's: a ``TrainerCallback`` reports loss and reward figures as metrics events, honours cancel and shutdown
between steps, and records each checkpoint TRL writes (its own ``checkpoint-N`` folders, which also hold the
optimizer, scheduler and RNG state, so a resumed job continues through ``resume_from_checkpoint``).

Prompts are rendered exactly as for supervised training and serving (``core.templates``): the prompt is the
conversation up to the final assistant turn, each reply is that turn's text through its end-of-turn token. Pairs
are tokenized here, as supervised examples are (``core.control_tokens``): a control token typed inside a message is
text, never a turn boundary; TRL's own tokenization, which parses every special token in the rendered text, is
skipped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from core.contracts import Hyperparameters, JobStage, fine_tuned_model_id
from core.control_tokens import ControlTokens
from core.datasets import PreferencePair, is_preference_format, load_preference_pairs
from core.db import SessionFactory
from core.settings import Settings
from core.storage import checkpoints_dir
from core.templates import conversation_segments, resolve_template, template_text
from worker.pipeline.checkpoints import STATE_FILE, is_complete
from worker.pipeline.data import split_validation, steps_per_epoch
from worker.pipeline.device import Compute, check_quantization, resolve_compute
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
from worker.pipeline.progress import JobReporter
from worker.pipeline.recipe import merge_and_publish, prepare_start
from worker.pipeline.train import TrainingHooks, load_base_model, lora_config, trainable_parameters
from worker.spec import FileSpec, JobSpec

log = logging.getLogger("conch.worker.dpo")

# TRL's names for the figures each log carries -> the names Conch's metrics events use.
_REWARD_FIGURES = {
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
}


@dataclass(frozen=True)
class RenderedPair:
    """A pair as the model reads it: the rendered prompt, and each reply through its end-of-turn token, as text
    (for the job's report and the checkpoint fingerprint) and as the token ids it trains on."""

    prompt: str
    chosen: str
    rejected: str
    prompt_ids: tuple[int, ...] = ()
    chosen_ids: tuple[int, ...] = ()
    rejected_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}

    def to_tokens(self) -> dict[str, list[int]]:
        return {
            "prompt_ids": list(self.prompt_ids),
            "chosen_ids": list(self.chosen_ids),
            "rejected_ids": list(self.rejected_ids),
        }


def read_pairs(file: FileSpec, param: str) -> list[PreferencePair]:
    if not file.path.is_file():
        raise PipelineError("file_not_found", f"the dataset of {file.public_id} is missing from storage", param)
    if not is_preference_format(file.format):
        raise PipelineError("invalid_file", f"{file.public_id} holds no preference pairs", param)
    try:
        return load_preference_pairs(file.path, file.format, file.mapping)  # type: ignore[arg-type]
    except ValueError as exc:
        raise PipelineError("invalid_file", f"{file.public_id} no longer validates: {exc}", param) from exc


def _reply_text(text: str, eos: str | None) -> str:
    """The reply segment ends with the template's end-of-turn token and maybe a newline after it; the newline is
    not part of what the model says (and TRL would otherwise add a second EOS after it)."""
    stripped = text.rstrip()
    return stripped if eos and stripped.endswith(eos) else text


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def render_pair(tokenizer: Any, control: ControlTokens, pair: PreferencePair, template: str) -> RenderedPair:
    chosen = conversation_segments(tokenizer, control.mark(pair.conversation(preferred=True)), template)
    rejected = conversation_segments(tokenizer, control.mark(pair.conversation(preferred=False)), template)
    prompt = "".join(s.text for s in chosen[:-1])
    if "".join(s.text for s in rejected[:-1]) != prompt:
        raise ValueError("the chat template renders the prompt differently before the two replies")
    eos = getattr(tokenizer, "eos_token", None)
    chosen_text, rejected_text = _reply_text(chosen[-1].text, eos), _reply_text(rejected[-1].text, eos)
    prompt_ids, with_chosen, with_rejected = control.encode_many([prompt, prompt + chosen_text, prompt + rejected_text])
    # A reply starts where the prompt's tokens and the whole pair's part (a merge across the boundary moves it).
    cut = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    eos_id = getattr(tokenizer, "eos_token_id", None)
    replies = [with_chosen[cut:], with_rejected[cut:]]
    if isinstance(eos_id, int):  # every reply ends the turn, whatever the template's end-of-turn token is
        replies = [ids if ids[-1:] == [eos_id] else [*ids, eos_id] for ids in replies]
    return RenderedPair(
        control.unmark(prompt),
        control.unmark(chosen_text),
        control.unmark(rejected_text),
        tuple(prompt_ids[:cut]),
        tuple(replies[0]),
        tuple(replies[1]),
    )


def render_pairs(tokenizer: Any, pairs: list[PreferencePair], template: str) -> list[RenderedPair]:
    control = ControlTokens(tokenizer, template_text(template, tokenizer))
    try:
        return [render_pair(tokenizer, control, pair, template) for pair in pairs]
    except ValueError as exc:  # a chat template that cannot render these conversations
        raise PipelineError("invalid_template", str(exc), "template") from exc


def pair_stats(rows: list[RenderedPair], cutoff_len: int) -> dict[str, Any]:
    """Token counts the pre-flight report shows; a pair longer than ``cutoff_len`` is cut at its end."""
    lengths = [(len(r.prompt_ids) + len(r.chosen_ids), len(r.prompt_ids) + len(r.rejected_ids)) for r in rows]
    tokens = sum(a + b for a, b in lengths)
    return {
        "pairs": len(rows),
        "tokens": tokens,
        "truncated": sum(1 for a, b in lengths if max(a, b) > cutoff_len),
        "longest": max((max(a, b) for a, b in lengths), default=0),
        "mean_length": round(tokens / (2 * len(rows)), 1) if rows else 0,
    }


def fingerprint(rows: list[RenderedPair], hp: Hyperparameters, seed: int) -> str:
    """Identifies what a checkpoint was trained on; a resume only continues a run with the same one."""
    digest = hashlib.sha256(f"{seed}:{hp.model_dump_json()}".encode())
    for row in rows:
        digest.update(json.dumps(row.to_json(), sort_keys=True).encode())
    return digest.hexdigest()[:32]


def make_callback(hooks: TrainingHooks, fingerprint_value: str, tokens_per_pair: float) -> Any:
    """A TRL/transformers callback that speaks to the job through the same hooks as Conch's own loop. TRL logs the
    tokens it has trained on (``num_tokens``); the estimate from the pairs' mean length is a fallback."""
    from transformers import TrainerCallback

    class JobCallback(TrainerCallback):
        def __init__(self) -> None:
            self.stop_reason: StopReason | None = None
            self.saved_step: int | None = None
            self.started = time.monotonic()
            self.last: dict[str, float] = {"time": self.started, "tokens": 0.0}
            self.figures: dict[str, Any] = {}
            # TRL counts tokens from 0 in every process: a resumed run adds what the checkpoint had trained.
            self.token_offset = 0.0
            self.start_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()
            self.start_step = int(state.global_step)  # after a resume, the checkpoint's step
            self.last = {"time": self.started, "tokens": self.token_offset}

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            reason = hooks.should_stop()
            if reason is not None and reason != "shutdown":
                raise TrainingStopped(reason)  # cancel or lost lease: nothing of this run is kept

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            reason = hooks.should_stop()
            if reason == "shutdown":
                # A graceful stop keeps the work done so far: checkpoint this step, then end the loop.
                self.stop_reason = reason
                control.should_save = True
                control.should_training_stop = True
            elif reason is not None:
                raise TrainingStopped(reason)
            if state.global_step >= state.max_steps:
                control.should_save = True  # the last step is a checkpoint too: the merge reads its adapter

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # Written last, so a folder with it is complete (checkpoints.is_complete); names the run it continues.
            (folder / STATE_FILE).write_text(
                json.dumps(
                    {
                        "step": state.global_step,
                        "data_fingerprint": fingerprint_value,
                        "trained_tokens": int(self.last["tokens"]),
                        **self.figures,
                    }
                )
            )
            self.saved_step = state.global_step
            hooks.on_checkpoint(state.global_step, folder, {"step": state.global_step, **self.figures})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            logs = dict(logs or {})
            step, total = int(state.global_step), int(state.max_steps)
            epoch = round(float(state.epoch or 0.0), 4)
            if "eval_loss" in logs:
                record = {"step": step, "total_steps": total, "epoch": epoch, "eval_loss": round(logs["eval_loss"], 6)}
                for name, ours in _REWARD_FIGURES.items():
                    if f"eval_{name}" in logs:
                        record[f"eval_{ours}"] = round(float(logs[f"eval_{name}"]), 6)
                hooks.on_eval(record)
                return
            if "loss" not in logs:
                return  # the end-of-training summary; the job's final metrics come from run_dpo
            now = time.monotonic()
            done = step - self.start_step
            tokens = self.token_offset + float(
                logs.get("num_tokens", done * args.per_device_train_batch_size * tokens_per_pair)
            )
            rate = (tokens - self.last["tokens"]) / max(now - self.last["time"], 1e-9)
            self.last = {"time": now, "tokens": tokens}
            per_step = (now - self.started) / max(step - self.start_step, 1)
            metrics: dict[str, Any] = {
                "step": step,
                "total_steps": total,
                "epoch": epoch,
                "loss": round(float(logs["loss"]), 6),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "grad_norm": round(float(logs.get("grad_norm", 0.0)), 6),
                "tokens_per_second": round(rate, 2),
                "eta_seconds": round(per_step * (total - step), 1),
                "trained_tokens": int(tokens),
            }
            for name, ours in _REWARD_FIGURES.items():
                if name in logs:
                    metrics[ours] = round(float(logs[name]), 6)
            self.figures = {k: metrics[k] for k in ("loss", "reward_accuracy", "reward_margin") if k in metrics}
            hooks.on_log(metrics)

    return JobCallback()


def _config(
    hp: Hyperparameters, compute: Compute, output_dir: Path, seed: int, total_steps: int, has_eval: bool
) -> Any:
    from transformers import TrainingArguments
    from trl import DPOConfig

    # TRL turns checkpointing on unless told otherwise; transformers 5 names it activation_checkpointing (the old
    # name warns), 4.57 knows only gradient_checkpointing.
    checkpointing: dict[str, Any] = (
        {"activation_checkpointing": hp.gradient_checkpointing, "gradient_checkpointing": None}
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else {"gradient_checkpointing": hp.gradient_checkpointing}
    )
    return DPOConfig(
        **checkpointing,
        output_dir=str(output_dir),
        beta=hp.beta,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.num_train_epochs,
        per_device_train_batch_size=hp.per_device_train_batch_size,
        per_device_eval_batch_size=hp.per_device_train_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        max_grad_norm=hp.max_grad_norm,
        lr_scheduler_type=hp.lr_scheduler_type,
        warmup_steps=math.ceil(hp.warmup_ratio * total_steps),
        weight_decay=0.0,  # as Conch's own loop
        max_length=hp.cutoff_len,
        seed=seed,
        data_seed=seed,
        logging_steps=hp.logging_steps,
        # Checkpoints every save_steps (0: only the last one, which the callback asks for).
        save_strategy="steps" if hp.save_steps else "no",
        save_steps=hp.save_steps or 1,
        save_total_limit=None,  # the job keeps its newest few (progress.KEEP_CHECKPOINTS)
        eval_strategy="epoch" if has_eval else "no",
        bf16=compute.precision == "bf16",
        fp16=compute.precision == "fp16",
        use_cpu=compute.device.type == "cpu",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=compute.device.type == "cuda",
        dataset_num_proc=None,
        save_only_model=False,
    )


def run_dpo(
    spec: JobSpec, reporter: JobReporter, session_factory: SessionFactory, settings: Settings, hp: Hyperparameters
) -> str:
    """Train the job with DPO, merge and publish it; returns the fine-tuned model id."""
    compute = resolve_compute(hp.compute_type)
    check_quantization(hp.quantization, compute)
    torch.manual_seed(spec.seed)
    model_id = fine_tuned_model_id(spec.model, spec.suffix, spec.public_id)
    base_path, hp = prepare_start(spec, reporter, session_factory, settings, hp)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    template = resolve_template(hp.template, tokenizer)
    pairs = read_pairs(spec.training_file, "training_file")
    pairs = pairs[: hp.max_samples] if hp.max_samples else pairs
    if spec.validation_file:
        eval_pairs = read_pairs(spec.validation_file, "validation_file")
    else:
        # The same seeded hold-out as supervised jobs; it only shuffles indices, whatever the examples are.
        held = split_validation(pairs, hp.val_size, spec.seed)  # type: ignore[arg-type]
        pairs, eval_pairs = cast(tuple[list[PreferencePair], list[PreferencePair]], held)
    rows, eval_rows = render_pairs(tokenizer, pairs, template), render_pairs(tokenizer, eval_pairs, template)
    stats = pair_stats(rows, hp.cutoff_len)
    first = rows[0]
    reporter.event(
        f"Preference data: {stats['pairs']} pairs, {stats['tokens']} tokens (prompt + reply, both replies); "
        f"{stats['truncated']} cut at cutoff_len={hp.cutoff_len}; {len(eval_rows)} held out for evaluation; "
        f"template {template}. First pair as the model sees it:\n{first.prompt}⟪preferred⟫{first.chosen}"
        f"\n⟪rejected⟫{first.rejected}",
        data={"stage": JobStage.VALIDATING.value, "train": stats, "validation_pairs": len(eval_rows)},
    )
    reporter.check_stop()

    base = load_base_model(
        base_path, compute, quantization=hp.quantization, gradient_checkpointing=hp.gradient_checkpointing
    )
    per_epoch = steps_per_epoch(len(rows), hp.per_device_train_batch_size, hp.gradient_accumulation_steps)
    total_steps = max(1, math.ceil(hp.num_train_epochs * per_epoch))
    output_dir = checkpoints_dir(spec.job_id, settings)
    run_fingerprint = fingerprint(rows, hp, spec.seed)
    callback = make_callback(reporter, run_fingerprint, stats["tokens"] / max(len(rows), 1))
    trainer = _trainer(base, tokenizer, rows, eval_rows, hp, compute, output_dir, spec.seed, total_steps, callback)
    trainable, total = trainable_parameters(trainer.model)
    targets = "all linear layers" if hp.lora_target == "all" else str(hp.lora_target)
    reporter.event(
        f"Plan: DPO (beta {hp.beta:g}), {total_steps} steps ({per_epoch} per epoch x {hp.num_train_epochs:g} "
        f"epochs, batch {hp.per_device_train_batch_size} pairs x {hp.gradient_accumulation_steps} accumulation) on "
        f"{compute.describe()}; LoRA rank {hp.lora_rank} on {targets}: {trainable:,} trainable of {total:,} "
        "parameters; the reference is the start model with the adapter disabled",
        data={
            "stage": JobStage.VALIDATING.value,
            "method": "dpo",
            "beta": hp.beta,
            "total_steps": total_steps,
            "steps_per_epoch": per_epoch,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "device": compute.device.type,
            "precision": compute.precision,
        },
        progress={"step": 0, "total_steps": total_steps, "epoch": 0.0, "percent": 0.0},
    )
    resume_from = _resumable(reporter, run_fingerprint)
    reporter.stage(JobStage.TRAINING, "Training started" if resume_from is None else "Training resumed")
    if resume_from is not None:
        callback.token_offset = float(json.loads((resume_from / STATE_FILE).read_text()).get("trained_tokens", 0))
        reporter.event(
            f"Resuming from the checkpoint {resume_from.name}",
            data={"checkpoint": resume_from.name},
        )
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.monotonic() - started
    steps = int(trainer.state.global_step)
    if callback.stop_reason is not None:
        raise TrainingStopped(callback.stop_reason, callback.saved_step)
    adapter_dir = output_dir / f"checkpoint-{steps}"
    if not is_complete(adapter_dir):
        raise PipelineError("checkpoint_missing", f"the final checkpoint of step {steps} was not written")
    figures = dict(callback.figures)
    trained_tokens = int(callback.last["tokens"])
    del trainer, base
    gc.collect()
    reporter.check_stop()  # a cancel that arrived during the last step still wins over publishing

    metrics: dict[str, Any] = {
        "method": "dpo",
        "beta": hp.beta,
        "steps": steps,
        "epochs": round(steps / per_epoch, 4),
        "train_loss": output.metrics.get("train_loss"),
        "reward_accuracy": figures.get("reward_accuracy"),
        "reward_margin": figures.get("reward_margin"),
        "trained_tokens": trained_tokens,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_runtime_seconds": round(runtime, 2),
        "resumed_from_checkpoint": resume_from.name if resume_from else None,
        "compute": compute.describe(),
    }
    return merge_and_publish(
        spec,
        reporter,
        session_factory,
        settings,
        model_id=model_id,
        base_path=base_path,
        adapter_dir=adapter_dir,
        template=template,
        eval_conversations=[pair.conversation() for pair in eval_pairs],
        metrics={k: v for k, v in metrics.items() if v is not None},
        trained_tokens=trained_tokens,
        progress={
            "step": steps,
            "total_steps": total_steps,
            "epoch": metrics["epochs"],
            "percent": 100.0,
            "eta_seconds": 0,
        },
    )


def _trainer(
    base: Any,
    tokenizer: Any,
    rows: list[RenderedPair],
    eval_rows: list[RenderedPair],
    hp: Hyperparameters,
    compute: Compute,
    output_dir: Path,
    seed: int,
    total_steps: int,
    callback: Any,
) -> Any:
    import datasets
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's trainer on pairs tokenized by ``render_pair``: its own preparation (prompt extraction, EOS text,
        tokenization with every special token parsed) is replaced by the one filter it applies afterwards."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if args.max_length is not None and args.truncation_mode == "keep_start":
                # A prompt that fills max_length leaves no reply token to learn from (TRL drops those too).
                return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
            return dataset

    datasets.disable_progress_bars()  # the job's events report progress; bars would only clutter the worker log
    train = Dataset.from_list([r.to_tokens() for r in rows])
    evaluation = Dataset.from_list([r.to_tokens() for r in eval_rows]) if eval_rows else None
    try:
        # With a LoRA config TRL wraps the plain model itself, and then takes the reference log-probabilities
        # with the adapter disabled: one copy of the weights.
        trainer = PretokenizedDPOTrainer(
            model=base,
            args=_config(hp, compute, output_dir, seed, total_steps, bool(eval_rows)),
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            callbacks=[callback],
            peft_config=lora_config(hp),
        )
    except ValueError as exc:
        if "target" in str(exc).lower() and "module" in str(exc).lower():
            raise PipelineError("invalid_lora_target", f"lora_target: {exc}", "lora_target") from exc
        raise
    trainer.remove_callback(PrinterCallback)  # it prints every log to stdout; the callback reports them instead
    return trainer


def _resumable(reporter: JobReporter, run_fingerprint: str) -> Path | None:
    """The newest complete checkpoint of this very run (same pairs, knobs and seed), if the job has one."""
    folder = reporter.latest_checkpoint()
    if folder is None:
        return None
    try:
        saved = json.loads((folder / STATE_FILE).read_text()).get("data_fingerprint")
    except (OSError, ValueError):
        saved = None
    if saved != run_fingerprint or not (folder / "trainer_state.json").is_file():
        reporter.event(
            f"The checkpoint at {folder.name} does not match this run's data; training from the start",
            level="warning",
        )
        return None
    return folder
