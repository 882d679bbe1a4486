"""Request and response bodies, in OpenAI's shapes plus Conch's extras.

Request models forbid unknown fields, so a client cannot set what it must not (``status``, ``id``, a tenant) and a
misspelt knob is refused by name instead of silently ignored. They are strict about JSON types ("3" is not 3).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.contracts import ComputeType, LoraTarget, Quantization, SchedulerName, TemplateName
from core.device_classes import DEVICE_CLASS_PATTERN
from core.http.errors import ErrorResponse
from core.redact import hide_paths

Auto = Literal["auto"]
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RequestModel(BaseModel):
    # JSON parsers accept Infinity and NaN; no field takes them, and a JSON column could not store them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------- errors


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request"),
        (401, "Missing or invalid API key"),
        (404, "Not found (or owned by another tenant)"),
        (409, "Conflicts with the object's current state"),
        (422, "Invalid or unknown field"),
        (429, "Rate limit exceeded"),
        (500, "Server error"),
    )
}

# --------------------------------------------------------------------------------------------------- files


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None = None
    status_details: str | None = None
    # Conch extras.
    format: str
    num_examples: int
    sha256: str
    validation: dict[str, Any]


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# --------------------------------------------------------------------------------------------------- jobs


class HyperparametersIn(RequestModel):
    """OpenAI's three knobs (each may be "auto") and LLaMA-Factory's names; all optional, all range-checked."""

    n_epochs: int | Auto | None = None
    batch_size: int | Auto | None = Field(
        None, description="examples per optimiser step: per_device_train_batch_size x gradient_accumulation_steps"
    )
    learning_rate_multiplier: float | Auto | None = None

    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_target: LoraTarget | None = Field(
        None,
        description="'all' (every decoder layer's linear modules), or module names of the base model's architecture "
        "(a list or one comma-separated string, at most 64), e.g. ['q_proj', 'v_proj']",
    )
    cutoff_len: int | None = Field(
        None, description="tokens per example; per_device_train_batch_size x cutoff_len <= MAX_TOKENS_PER_STEP"
    )
    learning_rate: float | None = None
    num_train_epochs: float | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_grad_norm: float | None = None
    max_samples: int | None = None
    val_size: float | None = Field(
        None,
        description="fraction (<1) or count (>=1) of the training file held out for evaluation; must leave "
        "examples to train on",
    )
    lr_scheduler_type: SchedulerName | None = None
    warmup_ratio: float | None = None
    compute_type: ComputeType | None = None
    save_steps: int | None = None
    logging_steps: int | None = None
    train_on_prompt: bool | None = None
    template: TemplateName | None = None
    quantization: Quantization | None = Field(
        None, description="'4bit': QLoRA (bitsandbytes NF4, double quantization; a CUDA device class only)"
    )
    quantization_bit: int | None = Field(None, description="LLaMA-Factory's spelling: 4 is quantization '4bit'")
    gradient_checkpointing: bool | None = Field(
        None, description="recompute each layer's activations in the backward pass: less memory, slower steps"
    )
    num_devices: int | None = Field(
        None,
        description="training processes (GPUs) for the job, at most TRAINING_DEVICES_MAX; each takes "
        "per_device_train_batch_size examples per micro-batch",
    )


class SupervisedIn(RequestModel):
    hyperparameters: HyperparametersIn | None = None


class DpoHyperparametersIn(HyperparametersIn):
    """OpenAI's DPO knobs: ``beta`` on top of the supervised ones (and the same LoRA knobs)."""

    beta: float | Auto | None = Field(
        None, description="DPO temperature: higher keeps the model closer to the base (default 0.1)"
    )


class DpoIn(RequestModel):
    hyperparameters: DpoHyperparametersIn | None = None


class MethodIn(RequestModel):
    type: Literal["supervised", "dpo"]
    supervised: SupervisedIn | None = None
    dpo: DpoIn | None = None


class JobCreate(RequestModel):
    model: str = Field(
        min_length=1,
        max_length=255,
        description="a configured base model id, or a fine-tuned model (ft:...) or checkpoint (ft:...:ckpt-step-N) "
        "of this organization to continue training from",
    )
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(None, min_length=1, max_length=128)
    suffix: str | None = Field(None, description="up to 64 characters of letters, digits, '_' and '-'")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    auto_deploy: bool = True
    device_class: str | None = Field(
        None,
        pattern=DEVICE_CLASS_PATTERN,
        description="the device class to train on (its workers' queue); default DEFAULT_DEVICE_CLASS, else any",
    )

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not _SUFFIX_RE.match(value):
            raise ValueError("use 1-64 characters of letters, digits, '_' and '-'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, item in value.items():
            if not key or len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"keys are 1-{MAX_METADATA_KEY_CHARS} characters")
            if len(item) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"values are at most {MAX_METADATA_VALUE_CHARS} characters")
        return value


class OpenAIHyperparameters(BaseModel):
    n_epochs: int | float
    batch_size: int
    learning_rate_multiplier: float


class SupervisedOut(BaseModel):
    hyperparameters: OpenAIHyperparameters


class OpenAIDpoHyperparameters(OpenAIHyperparameters):
    beta: float


class DpoOut(BaseModel):
    hyperparameters: OpenAIDpoHyperparameters


class MethodOut(BaseModel):
    """As OpenAI reports it: the type and, under its name, that method's hyperparameters."""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedOut | None = None
    dpo: DpoOut | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: str = Field(
        description="queued -> running -> succeeded | failed | cancelled, with cancelling while a cancel is in "
        "flight. Files are validated at upload and the job's knobs against them at creation, so a job never "
        "waits in OpenAI's validating_files."
    )
    validation_file: str | None
    training_file: str
    hyperparameters: OpenAIHyperparameters
    trained_tokens: int | None
    error: JobError | None
    seed: int
    metadata: dict[str, str] | None
    method: MethodOut
    estimated_finish: int | None
    integrations: list[Any]
    user_provided_suffix: str | None
    # Conch extras.
    stage: str | None
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    attempts: int
    auto_deploy: bool
    conch_hyperparameters: dict[str, Any]
    device_class: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool


class EventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool


class CheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]
    fine_tuning_job_id: str


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# --------------------------------------------------------------------------------------------------- models


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    conch: dict[str, Any] = Field(description="kind (base|fine-tuned), lineage, metrics, deployment state")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


ServeAs = Literal["adapter", "merged"]


class DeployRequest(RequestModel):
    """The optional body of a deploy: how to serve the model."""

    serve_as: ServeAs | None = Field(
        default=None,
        description="adapter: a fine-tune's LoRA adapter on its base model's server (INFERENCE_BACKEND=vllm only); "
        "merged: its merged weights as a model of their own (every backend). Default: adapter where the backend "
        "can serve the model as one, else merged",
    )


class DeploymentOut(BaseModel):
    id: str
    object: Literal["deployment"] = "deployment"
    model: str
    status: str
    serve_as: str | None = Field(
        default=None, description="adapter or merged; null: the backend's default (requested before this field)"
    )
    reason: str | None
    requested_by: str | None
    created_at: int
    updated_at: int
    activated_at: int | None
    latency_seconds: float | None
    route: str | None = Field(default=None, description="the serving route, e.g. llamacpp:bf16")
    fidelity: dict[str, Any] | None = Field(
        default=None,
        description="next-token agreement and largest per-token KL of the route against the fp32 reference on "
        "the golden prompts, the threshold, and the routes it fell back from",
    )

    @field_validator("reason")
    @classmethod
    def _no_server_paths(cls, value: str | None) -> str | None:
        # Stored reasons quote the inference service's load errors, which name the model's folder.
        return hide_paths(value) if value is not None else None


class DeploymentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeploymentOut]
    has_more: bool
