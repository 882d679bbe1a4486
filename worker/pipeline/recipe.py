"""The recipe, in order: base model -> tokenizer -> dataset -> template -> tokens with labels -> pre-flight report
-> model + LoRA -> (resume) -> train -> merge -> publish."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from core.contracts import Hyperparameters, JobStage, fine_tuned_model_id
from core.datasets import load_conversations
from core.db import SessionFactory
from core.deployments import adapter_replicas
from core.servability import adapter_serving
from core.settings import Settings
from core.storage import atomic_directory, checkpoints_dir, fine_tuned_dir
from worker.pipeline.data import PreparedData, prepare_data, render_with_mask
from worker.pipeline.device import check_quantization, preflight_memory, resolve_compute
from worker.pipeline.distributed import Distribution
from worker.pipeline.errors import PipelineError
from worker.pipeline.merge import merge_adapter
from worker.pipeline.prepare import BaseModelError, prepare_start_model
from worker.pipeline.progress import JobReporter
from worker.pipeline.publish import register_model
from worker.pipeline.serving import check_adapter_servable, write_model_serving_files
from worker.pipeline.train import LoraTrainer, attach_lora, load_base_model, trainable_parameters
from worker.spec import FileSpec, JobSpec

log = logging.getLogger("conch.worker.recipe")


def parse_hyperparameters(raw: dict[str, Any]) -> Hyperparameters:
    try:
        return Hyperparameters.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or None
        raise PipelineError("invalid_hyperparameters", f"{field}: {first.get('msg')}", field) from exc


def read_conversations(file: FileSpec, param: str) -> list[list[dict[str, Any]]]:
    if not file.path.is_file():
        raise PipelineError("file_not_found", f"the dataset of {file.public_id} is missing from storage", param)
    if file.format not in ("alpaca", "sharegpt", "openai"):
        raise PipelineError("invalid_file", f"{file.public_id} has no known dataset format", param)
    try:
        return load_conversations(file.path, file.format, file.mapping)  # type: ignore[arg-type]
    except ValueError as exc:
        raise PipelineError("invalid_file", f"{file.public_id} no longer validates: {exc}", param) from exc


def _report_data(reporter: JobReporter, data: PreparedData, hp: Hyperparameters) -> None:
    train = data.train_stats
    reporter.event(
        f"Training data: {train.examples} examples, {train.tokens} tokens of which {train.trained_tokens} are "
        f"trained; {train.truncated} truncated at cutoff_len={hp.cutoff_len}, {train.dropped} dropped "
        f"(nothing left to train); template {data.template}",
        data={"stage": JobStage.VALIDATING.value, "train": train.to_json(), "template": data.template},
    )
    if data.eval:
        reporter.event(
            f"Validation data: {data.eval_stats.examples} examples, {data.eval_stats.tokens} tokens",
            data={"stage": JobStage.VALIDATING.value, "validation": data.eval_stats.to_json()},
        )
    if data.sample_segments:
        text = render_with_mask(data.sample_segments, hp.train_on_prompt)
        parts = [{"text": s.text, "trained": s.trainable or hp.train_on_prompt} for s in data.sample_segments]
        reporter.event(
            "First example as the model sees it; text inside ⟪ ⟫ is prompt and does not count toward the "
            f"loss:\n{text}",
            data={
                "stage": JobStage.VALIDATING.value,
                "example": parts,
            },
        )


def run_pipeline(
    spec: JobSpec,
    reporter: JobReporter,
    session_factory: SessionFactory,
    settings: Settings,
    *,
    distribution: Distribution | None = None,
) -> str:
    """Train, merge and publish the job; returns the fine-tuned model id. Raises PipelineError or TrainingStopped.

    With ``distribution`` this process is one rank of a job on several devices: every rank trains, and rank 0
    alone merges and publishes once training is over (worker.pipeline.distributed)."""
    hp = parse_hyperparameters(spec.hyperparameters)
    if hp.method == "dpo":  # one recipe per method; they share the start, data conventions and the tail
        from worker.pipeline.dpo import run_dpo

        return run_dpo(spec, reporter, session_factory, settings, hp)
    compute = resolve_compute(hp.compute_type, distribution.device if distribution else None)
    check_quantization(hp.quantization, compute)
    torch.manual_seed(spec.seed)
    model_id = fine_tuned_model_id(spec.model, spec.suffix, spec.public_id)

    with distribution.main_first() if distribution else contextlib.nullcontext():  # one rank prepares the base
        base_path, hp = prepare_start(spec, reporter, session_factory, settings, hp)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_conversations = read_conversations(spec.training_file, "training_file")
    validation = read_conversations(spec.validation_file, "validation_file") if spec.validation_file else None
    data = prepare_data(tokenizer, train_conversations, validation, hp, spec.seed)
    _report_data(reporter, data, hp)
    reporter.check_stop()

    memory = preflight_memory(base_path, hp, compute)  # refuses a run that cannot fit, before loading anything
    base = load_base_model(
        base_path, compute, quantization=hp.quantization, gradient_checkpointing=hp.gradient_checkpointing
    )
    model = attach_lora(base, hp, spec.seed)
    trainable, total = trainable_parameters(model)
    trainer = LoraTrainer(
        model,
        data.train,
        data.eval,
        hp,
        seed=spec.seed,
        compute=compute,
        pad_id=int(pad_id),
        checkpoint_root=checkpoints_dir(spec.job_id, settings),
        hooks=reporter,
        distribution=distribution,
    )
    plan = trainer.plan
    rate = trainer.measure_throughput()
    # Training passes over every epoch, plus one forward-only pass (about a third of the cost) per evaluation.
    evaluations = math.ceil(plan.epochs) if data.eval else 0
    estimate = (plan.epochs * data.train_stats.tokens + evaluations * data.eval_stats.tokens / 3) / rate
    targets = "all linear layers" if hp.lora_target == "all" else str(hp.lora_target)
    reporter.event(
        f"Plan: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch x {plan.epochs:g} epochs, batch "
        f"{plan.batch_size} x {plan.accumulation} accumulation"
        + (f" x {plan.devices} devices" if plan.devices > 1 else "")
        + f") on {compute.describe()}; LoRA rank "
        f"{hp.lora_rank} on {targets}: {trainable:,} trainable of {total:,} parameters; "
        f"estimated {estimate:.0f} s of training at {rate:.0f} tokens/s"
        + (f"; memory estimate {memory.describe()}" if memory else ""),
        data={
            "stage": JobStage.VALIDATING.value,
            **plan.to_json(),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "device": compute.device.type,
            "precision": compute.precision,
            "packed": trainer.attention_ratio is not None,
            "estimated_seconds": round(estimate, 1),
            "estimated_tokens_per_second": round(rate, 1),
            "memory_estimate": memory.to_json() if memory else None,
            "quantization": hp.quantization,
            "gradient_checkpointing": hp.gradient_checkpointing,
        },
        progress={"step": 0, "total_steps": plan.total_steps, "epoch": 0.0, "percent": 0.0},
    )
    resume_from = reporter.latest_checkpoint()
    if resume_from is not None and not trainer.matches(resume_from):
        # Only a worker upgrade that tokenizes differently gets here: start over rather than fail the job.
        reporter.event(
            f"The checkpoint at {resume_from.name} does not match this run's data; training from the start",
            level="warning",
        )
        resume_from = None
    if resume_from is not None:
        trainer.resume(resume_from)
        reporter.event(
            f"Resuming from the checkpoint at step {trainer.state.step}/{plan.total_steps}",
            data={"step": trainer.state.step, "checkpoint": resume_from.name},
        )
    reporter.stage(JobStage.TRAINING, "Training started" if resume_from is None else "Training resumed")
    result = trainer.run()
    del trainer, model
    gc.collect()
    reporter.check_stop()  # a cancel that arrived during the last step still wins over publishing
    if distribution is not None and not distribution.leave_training():
        return model_id  # rank 0 alone merges and publishes

    return merge_and_publish(
        spec,
        reporter,
        session_factory,
        settings,
        model_id=model_id,
        base_path=base_path,
        adapter_dir=result.adapter_dir,
        template=data.template,
        eval_conversations=data.eval_conversations,
        metrics=result.metrics,
        trained_tokens=result.trained_tokens,
        progress={
            "step": result.steps,
            "total_steps": plan.total_steps,
            "epoch": result.metrics.get("epochs"),
            "percent": 100.0,
            "eta_seconds": 0,
        },
    )


def prepare_start(
    spec: JobSpec, reporter: JobReporter, session_factory: SessionFactory, settings: Settings, hp: Hyperparameters
) -> tuple[Path, Hyperparameters]:
    """The folder of the weights training starts from (the base, or the fine-tune being continued), and the knobs
    with the chat template that model keeps. Shared by every method's recipe."""
    start_name = spec.parent_model or spec.model
    reporter.stage(JobStage.VALIDATING, f"Preparing {start_name} and the dataset")
    try:
        start = prepare_start_model(start_name, spec.tenant_id, session_factory, settings)
    except BaseModelError as exc:
        raise PipelineError("model_not_available", str(exc), "model") from exc
    base_path = start.path  # the weights training starts from: the base, or the fine-tune being continued
    if hp.template == "auto" and start.template != "auto":
        # A continued model keeps the chat template it was trained with.
        hp = hp.model_copy(update={"template": start.template})
    return base_path, hp


def merge_and_publish(
    spec: JobSpec,
    reporter: JobReporter,
    session_factory: SessionFactory,
    settings: Settings,
    *,
    model_id: str,
    base_path: Path,
    adapter_dir: Path,
    template: str,
    eval_conversations: list[list[dict[str, Any]]],
    metrics: dict[str, Any],
    trained_tokens: int,
    progress: dict[str, Any],
) -> str:
    """The tail every method shares: merge the trained adapter into the start model, write the serving files,
    publish the model; returns its id. A cancel is honoured up to the moment of publishing."""
    # An adapter the serving engine would refuse fails the job here, before anything is merged or published.
    with session_factory() as session:
        serving = adapter_serving(settings, adapter_replicas(session, settings))
    check_adapter_servable(adapter_dir, spec.model, settings, serving, continued=spec.parent_model is not None)
    reporter.stage(JobStage.MERGING, "Merging the adapter into the base model")
    folder = fine_tuned_dir(spec.job_id, settings)
    manifest = {
        "model_id": model_id,
        "base_model": spec.model,
        "job_id": spec.public_id,
        "parent_model": spec.parent_model,
    }
    with atomic_directory(folder) as tmp:
        merged = merge_adapter(base_path, adapter_dir, tmp, template=template, manifest=manifest)
        reporter.event("Writing the serving files: reference answers to the golden prompts and the llama.cpp export")
        files = write_model_serving_files(tmp, merged, template, eval_conversations, settings)
        del merged
        reporter.event(
            "Serving files written: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in files.seconds.items()),
            data={"stage": JobStage.MERGING.value, "serving_files": files.seconds},
        )
    reporter.check_stop()  # a cancel that arrived while merging is honoured before anything is published
    reporter.stage(JobStage.PUBLISHING, f"Publishing {model_id}")
    reporter.control.finishing.set()
    register_model(
        session_factory,
        spec,
        reporter.owner,
        model_id=model_id,
        folder=folder,
        metrics=metrics,
        trained_tokens=trained_tokens,
        progress=progress,
        settings=settings,
    )
    return model_id
