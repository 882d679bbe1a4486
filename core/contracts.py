"""What the services agree on: task names, statuses, stages, the typed hyperparameters, pub/sub messages."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Celery task names: the api enqueues by name and never imports worker code.
TASK_FINE_TUNE = "conch.fine_tune"


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
LIVE_STATUSES = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})


class JobStage(StrEnum):
    VALIDATING = "validating"
    TRAINING = "training"
    EVALUATING = "evaluating"
    MERGING = "merging"
    PUBLISHING = "publishing"
    DEPLOYING = "deploying"


class FileStatus(StrEnum):
    """An uploaded file's status, as OpenAI reports it: only validated files are kept, so every one is processed."""

    PROCESSED = "processed"


class ModelStatus(StrEnum):
    """A published model's status: its folder is written and renamed into place before the row says ready."""

    READY = "ready"


class DeploymentStatus(StrEnum):
    PENDING = "pending"
    LOADING = "loading"
    ACTIVE = "active"
    SUPERSEDED = "superseded"
    FAILED = "failed"


LoraTarget = str | list[str]
SchedulerName = Literal[
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
]
ComputeType = Literal["auto", "fp32", "fp16", "bf16"]
TemplateName = Literal["auto", "chatml", "llama3", "qwen", "deepseekr1"]
Quantization = Literal["none", "4bit"]
# How a job trains: supervised fine-tuning on conversations, or DPO on preference pairs (OpenAI's method.type).
MethodType = Literal["supervised", "dpo"]


class Hyperparameters(BaseModel):
    """LoRA fine-tuning knobs, named as LLaMA-Factory names them. Defaults teach a small dataset something."""

    # Infinity and NaN are not numbers a run can use, and JSON columns cannot store them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lora_rank: int = Field(8, ge=1, le=512)
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="default: 2 x lora_rank")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target: LoraTarget = Field("all", description="'all' linear layers, or module names")
    cutoff_len: int = Field(1024, ge=8, le=131072)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    num_train_epochs: float = Field(3.0, gt=0.0, le=1000.0)
    per_device_train_batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1000.0)
    max_samples: int | None = Field(None, ge=1)
    val_size: float = Field(0.0, ge=0.0, description="fraction (<1) or count (>=1) held out for evaluation")
    lr_scheduler_type: SchedulerName = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    compute_type: ComputeType = "auto"
    save_steps: int = Field(25, ge=0, le=1_000_000, description="0 saves only at the end")
    logging_steps: int = Field(1, ge=1, le=100_000)
    train_on_prompt: bool = False
    template: TemplateName = "auto"
    # Memory on small GPUs: QLoRA (bitsandbytes NF4 with double quantization, CUDA only) and recomputing each
    # layer's activations in the backward pass instead of keeping them.
    quantization: Quantization = "none"
    gradient_checkpointing: bool = False
    # Training processes the job runs on, one per GPU (on CPU only where TRAINING_CPU_PROCESSES allows it);
    # None: the worker's TRAINING_DEVICES_DEFAULT. Each process takes per_device_train_batch_size examples per
    # micro-batch, so the effective batch is per_device x gradient_accumulation_steps x num_devices.
    num_devices: int | None = Field(None, ge=1, le=1024)
    # Stored with the knobs (no column of its own): rows written before DPO existed read back as supervised.
    method: MethodType = "supervised"
    beta: float = Field(0.1, gt=0.0, le=100.0, description="DPO only: how far the policy may move from the base")

    @model_validator(mode="after")
    def _check(self) -> Hyperparameters:
        if isinstance(self.lora_target, list) and not self.lora_target:
            raise ValueError("lora_target must name at least one module")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError("val_size is a fraction below 1 or a whole number of examples")
        return self

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank


def held_out_examples(val_size: float, examples: int) -> int:
    """How many of ``examples`` training examples ``val_size`` holds out for evaluation: a fraction below 1
    (at least one example), or a whole count. The api checks at creation that some are left to train on."""
    if val_size <= 0:
        return 0
    return max(1, round(examples * val_size)) if val_size < 1 else int(val_size)


class FineTuneTask(BaseModel):
    """The only payload the broker carries: an id. Workers re-read everything else from the database."""

    job_id: str


class DeploymentAnnouncement(BaseModel):
    deployment_id: str
    model_id: str
    tenant_id: str


def fine_tuned_model_id(base_model: str, suffix: str | None, job_public_id: str) -> str:
    """``ft:<base>:<suffix>:<ftjob-id>``; without a suffix the field stays empty (``ft:<base>::<ftjob-id>``),
    as OpenAI leaves an absent field empty, so the id always splits into the same four parts."""
    return f"ft:{base_model}:{suffix or ''}:{job_public_id}"


def checkpoint_model_id(model_id: str, step: int) -> str:
    """A checkpoint is addressable as its job's model id plus the step, as OpenAI names checkpoints."""
    return f"{model_id}:ckpt-step-{step}"


def parse_checkpoint_model_id(name: str) -> tuple[str, int] | None:
    """``<model id>:ckpt-step-<N>`` -> (model id, N); None for any other name."""
    model_id, sep, step = name.rpartition(":ckpt-step-")
    if not sep or not model_id or not step.isdigit() or len(step) > 9:
        return None
    return model_id, int(step)
