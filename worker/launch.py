"""A job on several devices (``num_devices`` > 1): the worker launches the training ranks with accelerate's
launcher and stays the process that holds the job.

The worker process keeps what it does for a one-process job: the claim, the lease and its heartbeat, and the
job's final state. The ranks (``worker.pipeline.distributed``) train; rank 0 also writes events, progress and
checkpoint rows under this worker's lease, then merges and publishes. The two sides share a small control folder
in the job's directory:

- ``stop``: the worker writes the reason to stop (cancel, shutdown, lease_lost) as soon as its heartbeat or a
  signal sets it; rank 0 reads it before every micro-batch and all ranks agree on it (``Distribution``).
- ``finishing``: rank 0 touches it just before publishing, so the heartbeat reads the job's end as that write
  rather than as a takeover.
- ``outcome-rank<N>.json``: how each rank ended; the worker turns rank 0's into the job's outcome.
- ``started-rank<N>``: the rank's process group is up (a rank with it and no outcome died of a signal).

Nothing here imports torch: launching is a subprocess (``accelerate launch``, torchrun underneath: gloo on CPU,
nccl on GPUs; FSDP, DeepSpeed ZeRO or several machines from TRAINING_ACCELERATE_CONFIG). The launcher dies with
the worker (parent-death signal) and each rank dies with the launcher, so a killed worker leaves no rank behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.contracts import Hyperparameters
from core.settings import Settings
from core.storage import job_dir
from worker.heartbeat import JobControl
from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.spec import JobSpec

log = logging.getLogger("conch.worker.launch")

RANK_MODULE = "worker.pipeline.distributed"
STOP_FILE = "stop"
FINISHING_FILE = "finishing"
STOP_REASONS = ("shutdown", "cancel", "lease_lost")  # least to most binding
POLL_SECONDS = 0.1
# A cancelled or lost job's ranks stop at their next micro-batch; ranks that have not ended this long after being
# told are stopped by force. A shutdown is left to finish its checkpoint.
FORCED_STOP_AFTER_SECONDS = 120.0
# Every rank has written its outcome: the job's result is known, and what is left is the ranks' exit. A launcher
# still running this long after that is stuck in a teardown (a rank blocked leaving its process group) and is ended.
EXIT_AFTER_OUTCOMES_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


class RanksCrashed(Exception):
    """The ranks ended without a usable outcome (a crash in one of them, or the launcher itself failed).

    ``rank_lost``: a rank that had started ended without writing any outcome (killed by a signal: a segfault in a
    native library, the kernel's OOM killer) while every rank that did write one only saw its peer go. Nothing in
    the job's code or data said no, so the job can go on from its last checkpoint, as it does when a worker dies.
    """

    def __init__(self, kind: str, *, out_of_memory: bool = False, rank_lost: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.out_of_memory = out_of_memory
        self.rank_lost = rank_lost


def outcome_file(folder: Path, rank: int) -> Path:
    return folder / f"outcome-rank{rank}.json"


def started_file(folder: Path, rank: int) -> Path:
    """Written by a rank once its process group is up: a rank that has one and no outcome died of a signal."""
    return folder / f"started-rank{rank}"


def control_folder(spec: JobSpec, settings: Settings) -> Path:
    return job_dir(spec.job_id, settings) / "ranks"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent ends (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def requested_devices(spec: JobSpec, settings: Settings) -> int:
    """How many training processes the job runs on; PipelineError (naming num_devices) when this worker
    cannot give them."""
    try:
        hp = Hyperparameters.model_validate(spec.hyperparameters)
    except ValidationError:
        return 1  # the pipeline reports bad knobs, naming the field
    devices = hp.num_devices or settings.training_devices_default
    if devices <= 1:
        return 1
    if hp.method != "supervised":
        raise PipelineError(
            "unsupported_num_devices",
            f"num_devices: {hp.method} jobs train on one device; send num_devices=1",
            "num_devices",
        )
    if devices > settings.training_devices_max:
        raise PipelineError(
            "too_many_devices",
            f"num_devices: {devices} devices asked for, above this server's limit of "
            f"{settings.training_devices_max} (TRAINING_DEVICES_MAX)",
            "num_devices",
        )
    config = read_accelerate_config(settings.training_accelerate_config) if settings.training_accelerate_config else {}
    check_accelerate_config(config, settings.training_accelerate_config)
    if int(config.get("num_machines") or 1) > 1:
        return devices  # the config file describes the machines; accelerate checks them
    gpus = visible_gpus()
    if gpus == 0 and not settings.training_cpu_processes:
        raise PipelineError(
            "devices_unavailable",
            f"num_devices: the job asks for {devices} devices and this worker has no GPU; send num_devices=1 "
            "(or allow CPU processes with TRAINING_CPU_PROCESSES)",
            "num_devices",
        )
    if 0 < gpus < devices:
        raise PipelineError(
            "devices_unavailable",
            f"num_devices: the job asks for {devices} devices and this worker has {gpus} GPUs",
            "num_devices",
        )
    return devices


def read_accelerate_config(path: str) -> dict[str, Any]:
    """TRAINING_ACCELERATE_CONFIG as accelerate reads it (YAML, or JSON by its suffix); PipelineError when it
    cannot be read, so the job fails at once rather than in the launcher."""
    import yaml

    try:
        text = Path(path).read_text()
        loaded = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise PipelineError(
            "devices_unavailable",
            f"num_devices: this worker's TRAINING_ACCELERATE_CONFIG ({path}) cannot be read: {exc}",
            "num_devices",
        ) from exc
    if not isinstance(loaded, dict):
        raise PipelineError(
            "devices_unavailable",
            f"num_devices: this worker's TRAINING_ACCELERATE_CONFIG ({path}) is not an accelerate config",
            "num_devices",
        )
    return loaded


def check_accelerate_config(config: dict[str, Any], path: str) -> None:
    """Refuse, before any process starts, an accelerate config this worker's training loop cannot run.

    - DeepSpeed: accelerate runs it only on GPUs, with the ``deepspeed`` package; without them the launcher or
      the ranks die at start-up.
    - FSDP1 (``fsdp_version: 1``, accelerate's default): the loop runs FSDP2 (``fully_shard``) only. FSDP1 keeps
      the embeddings and output layer in the root's flat parameter, which the loop's direct calls to the decoder
      cannot reach, and on CPU (gloo, torch 2.13) gathering its full state dict crashed the process (SIGSEGV).
    - FSDP offloading parameters to CPU memory on a worker without GPUs (torch pins the offloaded shards).
    - Other kinds (TPU, Megatron-LM): not a loop this worker has.
    """
    kind = str(config.get("distributed_type") or "NO").upper()
    where = f"this worker's TRAINING_ACCELERATE_CONFIG ({path})"
    if kind == "DEEPSPEED":
        if importlib.util.find_spec("deepspeed") is None:
            reason = "the deepspeed package is not installed"
        elif visible_gpus() == 0:
            reason = "accelerate runs DeepSpeed only on GPUs and this worker has none"
        else:
            return
        raise PipelineError(
            "devices_unavailable",
            f"num_devices: {where} asks for DeepSpeed, and {reason}; send num_devices=1",
            "num_devices",
        )
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        version = int(fsdp.get("fsdp_version") or 1)
        if version != 2:
            raise PipelineError(
                "devices_unavailable",
                f"num_devices: {where} asks for FSDP version {version}; Conch trains under FSDP2 only "
                "(fsdp_version: 2 in fsdp_config); send num_devices=1",
                "num_devices",
            )
        if str(fsdp.get("fsdp_offload_params")).lower() == "true" and visible_gpus() == 0:
            # torch pins offloaded shards in page-locked memory, which needs an accelerator: on CPU ranks
            # fully_shard raised "Cannot access accelerator device when none is available".
            raise PipelineError(
                "devices_unavailable",
                f"num_devices: {where} asks FSDP to offload parameters to CPU memory (fsdp_offload_params), which "
                "needs GPUs, and this worker trains on its CPU; send num_devices=1",
                "num_devices",
            )
        return
    if kind not in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA"):
        raise PipelineError(
            "devices_unavailable",
            f"num_devices: {where} asks for {kind}, which Conch's training loop does not run; send num_devices=1",
            "num_devices",
        )


def visible_gpus() -> int:
    import torch  # only a worker that claimed a multi-device job pays for the import

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def launcher_argv(devices: int, settings: Settings) -> list[str]:
    """``accelerate launch`` for ``devices`` processes: a config file when set, else DDP on this host."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(devices)]
    if settings.training_accelerate_config:
        argv += ["--config_file", settings.training_accelerate_config]
        config = read_accelerate_config(settings.training_accelerate_config)
        if int(config.get("num_machines") or 1) <= 1 and not config.get("main_process_port"):
            argv += ["--main_process_port", "0"]  # one host: a free port, as below
    else:
        # Port 0: a free port, so several jobs (or test runs) on one host do not collide.
        argv += ["--multi_gpu", "--num_machines", "1", "--main_process_port", "0"]
    # Precision is the job's compute_type, applied by the training loop itself.
    return [*argv, "--mixed_precision", "no", "--dynamo_backend", "no"]


def rank_environment(devices: int) -> dict[str, str]:
    """The host's cores shared out among the ranks (torchrun would give each one thread)."""
    threads = max(1, (os.cpu_count() or 1) // devices)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def run_ranks(spec: JobSpec, control: JobControl, settings: Settings, devices: int) -> None:
    """Train (and, on rank 0, publish) the job on ``devices`` processes; returns on success and raises what the
    one-process pipeline raises otherwise (TrainingStopped, PipelineError), or RanksCrashed."""
    folder = control_folder(spec, settings)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    argv = [
        *launcher_argv(devices, settings),
        "-m",
        RANK_MODULE,
        spec.public_id,
        "--owner",
        control.owner,
        "--control",
        str(folder),
    ]
    process = subprocess.Popen(
        argv,
        env=rank_environment(devices),
        start_new_session=True,  # signals meant for the worker's group (a terminal's ^C) go through the worker
        preexec_fn=die_with_parent,  # one system call in the child, no locks taken
    )
    log.info("job.ranks_started", extra={"job_id": spec.public_id, "devices": devices, "pid": process.pid})
    try:
        _supervise(process, control, folder, devices)
        exit_status = process.returncode
        outcomes = _read_outcomes(folder)
        log.info("job.ranks_ended", extra={"job_id": spec.public_id, "exit_status": exit_status, "outcomes": outcomes})
        _raise_outcome(folder, outcomes, exit_status, control, devices)
    finally:
        _end_launcher(process)
        shutil.rmtree(folder, ignore_errors=True)


def _supervise(process: subprocess.Popen[bytes], control: JobControl, folder: Path, devices: int) -> None:
    """Relay the stop flags to the ranks and the finishing flag back, until the launcher ends (or is stuck after
    every rank wrote its outcome)."""
    written: str | None = None
    told_at: float | None = None
    outcomes_at: float | None = None
    while process.poll() is None:
        reason = control.stop_reason()
        if reason is not None and reason != written:
            _write_text(folder / STOP_FILE, reason)
            written = reason
            told_at = told_at or time.monotonic()
        if not control.finishing.is_set() and (folder / FINISHING_FILE).exists():
            control.finishing.set()
        if told_at is not None and written != "shutdown" and time.monotonic() - told_at > FORCED_STOP_AFTER_SECONDS:
            log.warning("job.ranks_forced_stop", extra={"job_id": control.job_id.hex, "reason": written})
            return
        if outcomes_at is None and all(outcome_file(folder, rank).exists() for rank in range(devices)):
            outcomes_at = time.monotonic()
        if outcomes_at is not None and time.monotonic() - outcomes_at > EXIT_AFTER_OUTCOMES_SECONDS:
            log.warning("job.ranks_stuck_exiting", extra={"job_id": control.job_id.hex, "devices": devices})
            return
        time.sleep(POLL_SECONDS)
    if (folder / FINISHING_FILE).exists():
        control.finishing.set()


def _end_launcher(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """The launcher stops its ranks on SIGTERM; SIGKILL after ``grace`` (each rank then dies with it)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(10)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader sees the whole word or nothing


def _read_outcomes(folder: Path) -> dict[int, dict[str, Any]]:
    outcomes: dict[int, dict[str, Any]] = {}
    for path in folder.glob("outcome-rank*.json"):
        rank = path.stem.removeprefix("outcome-rank")
        with contextlib.suppress(OSError, ValueError):
            outcomes[int(rank)] = json.loads(path.read_text())
    return outcomes


def _raise_outcome(
    folder: Path, outcomes: dict[int, dict[str, Any]], exit_status: int | None, control: JobControl, devices: int
) -> None:
    main = outcomes.get(0)
    if main is not None:
        if main.get("outcome") == "succeeded":
            return
        if main.get("outcome") == "stopped":
            raise TrainingStopped(main.get("reason", "lease_lost"), main.get("checkpoint_step"))
    silent = sorted(rank for rank in range(devices) if started_file(folder, rank).exists() and rank not in outcomes)
    if silent and control.stop_reason() is None and all(_peer_lost(o) for o in outcomes.values()):
        # A rank that started and said nothing died of a signal; the others' errors only say that it went. Which
        # died first is not known when several said nothing: the launcher stops the others when one dies.
        named = " and ".join(str(rank) for rank in silent)
        raise RanksCrashed(f"training process{'es' if len(silent) > 1 else ''} {named} ended abruptly", rank_lost=True)
    # Rank 0 failed, crashed or was stopped by force: the first rank that says why speaks for the job.
    for rank in sorted(outcomes):
        outcome = outcomes[rank]
        if outcome.get("outcome") == "failed":
            error = outcome.get("error") or {}
            raise PipelineError(str(error.get("code")), str(error.get("message")), error.get("param"))
        if outcome.get("outcome") == "crashed":
            raise RanksCrashed(str(outcome.get("kind")), out_of_memory=bool(outcome.get("out_of_memory")))
    reason = control.stop_reason()
    if reason is not None:
        raise TrainingStopped(reason)  # type: ignore[arg-type]
    raise RanksCrashed(f"training processes ended with exit status {exit_status}")


def _peer_lost(outcome: dict[str, Any]) -> bool:
    """A rank's crash that only says a collective lost its peer (``worker.pipeline.distributed.peer_lost``)."""
    return outcome.get("outcome") == "crashed" and bool(outcome.get("peer_lost"))
