"""One rank of a job trained on several devices, launched by ``worker.launch`` through accelerate's launcher:

    python -m worker.pipeline.distributed <job id> --owner <the worker's lease owner> --control <folder>

Every rank runs the recipe up to the end of training, on its share of each step's batch: the step's examples are
the ones a single process would take for the same effective batch, dealt out round-robin, and each rank's loss is
normalised by the whole step's trained tokens, so the averaged gradients are the one-process gradient. accelerate
provides the process group (gloo on CPU, nccl on GPUs) and wraps the model (DDP; FSDP or DeepSpeed from an
accelerate config). Rank 0 alone talks to the job: events, progress and checkpoint rows under the worker's lease,
then merge and publish once the other ranks have left. Stopping is agreed: rank 0 reads the flag the worker
relays and a small all-reduce before every micro-batch tells every rank, so all stop at the same point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from core.jobs import LeaseLost
from core.storage import remove_stale_temporaries, temporary_sibling
from worker.launch import (
    FINISHING_FILE,
    STOP_FILE,
    STOP_REASONS,
    die_with_parent,
    outcome_file,
    started_file,
)
from worker.pipeline.checkpoints import ADAPTER_FILE, STATE_FILE, LoopState, checkpoint_name, load_checkpoint
from worker.pipeline.data import IGNORE, Batch
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
from worker.pipeline.progress import JobReporter

log = logging.getLogger("conch.worker.distributed")
T = TypeVar("T")
# Full (unsharded) state dicts of the trained weights only, gathered on rank 0 (the other ranks get none).
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
LEAVE_GROUP_SECONDS = 30.0  # a rank whose outcome is written waits this long to leave its process group
FSDP_OPTIMIZER_FILE = "optimizer.pt"  # under FSDP: the whole optimizer state, keyed by parameter name


# ------------------------------------------------------------------------------------------------ control


class _FileFlag:
    """A flag shared with the worker process through a file (``threading.Event``'s two methods)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def is_set(self) -> bool:
        return self.path.exists()

    def set(self) -> None:
        self.path.touch()


class _LeaseLostFlag:
    def __init__(self, control: RelayedControl) -> None:
        self.control = control

    def is_set(self) -> bool:
        return self.control.stop_reason() == "lease_lost"

    def set(self) -> None:  # only the worker's heartbeat learns that the lease is gone
        pass


class RelayedControl:
    """The job's flags as rank 0 sees them: written by the worker process that holds the lease."""

    def __init__(self, job_id: uuid.UUID, owner: str, folder: Path) -> None:
        self.job_id = job_id
        self.owner = owner
        self.folder = folder
        self.lease_lost = _LeaseLostFlag(self)
        self.finishing = _FileFlag(folder / FINISHING_FILE)

    def stop_reason(self) -> str | None:
        try:
            reason = (self.folder / STOP_FILE).read_text().strip()
        except OSError:
            return None
        return reason if reason in STOP_REASONS else None


# ------------------------------------------------------------------------------------------------ ranks


class Distribution:
    """This process's place among the job's ranks, and the few collective operations the loop needs."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index)
        self.world_size = int(accelerator.num_processes)
        self.is_main = bool(accelerator.is_main_process)
        device = torch.device(accelerator.device)
        # torch.load cannot map to "cpu:0", which is what a CPU rank's device may be called.
        self.device = torch.device("cpu") if device.type == "cpu" else device
        self.together = True  # every rank is still in the recipe (False once the others left after training)
        self.module: Any = None
        # FSDP shards parameters, gradients and optimizer state; DDP keeps a whole copy on every rank.
        self.sharded = str(accelerator.distributed_type) == str(DistributedType.FSDP)

    # ---------------------------------------------------------------------------------------- agreeing

    def agree_on_stop(self, reason: str | None) -> StopReason | None:
        """The most binding stop reason any rank holds (only rank 0 reads the worker's flag)."""
        if not self.together:
            return reason  # type: ignore[return-value]
        code = torch.tensor([STOP_REASONS.index(reason) + 1 if reason else 0], device=self.device)
        agreed = int(self.accelerator.gather(code).max())
        return STOP_REASONS[agreed - 1] if agreed else None  # type: ignore[return-value]

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.together:
            return value
        from accelerate.utils import broadcast_object_list

        holder = [value]
        broadcast_object_list(holder, from_process=0)
        return holder[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums across ranks (float64, exact for counts)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return [float(v) for v in self.accelerator.reduce(tensor, reduction="sum")]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 goes first (say, preparing the base model once), the others after it."""
        with self.accelerator.main_process_first():
            yield

    def leave_training(self) -> bool:
        """Training is over: the ranks part here. True on rank 0, which goes on to merge and publish."""
        self.accelerator.wait_for_everyone()
        self.together = False
        return self.is_main

    # ---------------------------------------------------------------------------------------- training

    def prepare(self, loss_fn: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """The loss as one module wrapped by accelerate (DDP, FSDP...), and the prepared optimizer. Every pass
        goes through that module afterwards: under FSDP the parameters are shards outside of it."""
        module, prepared = self.accelerator.prepare(LossModule(loss_fn), optimizer)
        self.module = module
        return module, prepared

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradients are averaged across ranks only on a step's last micro-batch."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], limit: float) -> float:
        """The whole gradient's norm, clipped to ``limit``. Under FSDP the wrapped module's own parameters (the
        sharded ones, which replaced those the loop collected) go to accelerate's FSDP-aware clipping."""
        if self.sharded:
            params = list(self.module.parameters())
        return float(self.accelerator.clip_grad_norm_(params, limit))

    def deal(self, items: list[T]) -> list[tuple[T, bool]]:
        """This rank's every n-th item, each with whether it counts. A pass through the wrapped module is a
        collective (FSDP gathers shards, DDP syncs buffers), so each rank makes the same number of them: a rank
        short of one repeats the first item, not counted."""
        mine = [(item, True) for item in items[self.rank :: self.world_size]]
        if items:
            mine += [(items[0], False)] * (-(-len(items) // self.world_size) - len(mine))
        return mine

    # ---------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self,
        root: Path,
        model: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: LoopState,
        scaler: torch.amp.GradScaler | None,
    ) -> Path:
        """Checkpoint ``step-N`` written by every rank: rank 0 writes the adapter, scheduler and loop state, and
        each rank its own optimizer state and RNG (``optimizer-rank<N>.pt``, ``rng-rank<N>.pt``; rank 0's under
        the one-process names). The folder gets its final name only after every rank's part is on disk, so a
        checkpoint under its final name is complete."""
        final = root / checkpoint_name(state.step)
        partial: Path | None = None
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(root)
            partial = temporary_sibling(final)
            partial.mkdir()
        partial = Path(self.share(str(partial)))
        suffix = "" if self.is_main else f"-rank{self.rank}"
        if self.sharded:  # the whole optimizer state, gathered on rank 0 and keyed by parameter name
            whole = get_optimizer_state_dict(self.module, optimizer, options=_FULL_ON_RANK0)
            if self.is_main:
                torch.save(whole, partial / FSDP_OPTIMIZER_FILE)
        else:  # DDP: each rank's own copy
            torch.save(optimizer.state_dict(), partial / f"optimizer{suffix}.pt")
        torch.save(rng_state(), partial / f"rng{suffix}.pt")
        adapter = self._adapter_state()  # a collective under FSDP
        if self.is_main:
            model.save_pretrained(str(partial), state_dict=adapter, safe_serialization=True)
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            if scaler is not None and scaler.is_enabled():
                torch.save(scaler.state_dict(), partial / "scaler.pt")
        self.accelerator.wait_for_everyone()  # every rank's part is written
        if self.is_main:
            written = {**state.to_json(), "ranks": self.world_size, "sharded": self.sharded}
            (partial / STATE_FILE).write_text(json.dumps(written, indent=1))
            _publish_folder(partial, final)
        return final

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained (adapter) weights whole on rank 0, empty elsewhere; the frozen base is not gathered."""
        whole = get_model_state_dict(self.module, options=_FULL_ON_RANK0)
        prefix = "model."  # LossModule's attribute holding the PEFT model
        return {k[len(prefix) :]: v for k, v in whole.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}

    def load_checkpoint(
        self,
        folder: Path,
        model: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler | None,
    ) -> LoopState:
        """Restore a checkpoint written by ``save_checkpoint`` with the same number of ranks, under DDP or FSDP
        (either way: the worker's TRAINING_ACCELERATE_CONFIG may change between two attempts); returns the loop
        state."""
        written = json.loads((folder / STATE_FILE).read_text())
        if not self.sharded:
            # Under FSDP the optimizer state was written whole and keyed by name, in the optimizer's own order:
            # torch's load_state_dict maps it by position, as it does DDP's.
            state = load_checkpoint(folder, model, optimizer, scheduler, scaler)
            self.load_rank_part(folder, optimizer)
            return state
        from safetensors.torch import load_file

        # The adapter file names each weight as peft saves it (without the adapter's name); the wrapped module's
        # trainable parameters are the same weights under their full names.
        saved = load_file(str(folder / ADAPTER_FILE))
        adapter_name = f".{getattr(model, 'active_adapter', 'default')}."
        weights: dict[str, Any] = {}
        for name, parameter in self.module.named_parameters():
            if parameter.requires_grad:
                key = name.removeprefix("model.").replace(adapter_name, ".")
                if key not in saved:
                    raise FileNotFoundError(f"checkpoint {folder} lacks {key}")
                weights[name] = saved[key]
        # Every rank reads the whole state and keeps its own shards of it.
        set_model_state_dict(self.module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        whole = torch.load(folder / FSDP_OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        if not written.get("sharded"):  # written under DDP: keyed by position in the optimizer; here by name
            names = {parameter: name for name, parameter in self.module.named_parameters()}
            order = [names[p] for group in optimizer.param_groups for p in group["params"]]
            whole = {
                "state": {order[int(i)]: value for i, value in whole["state"].items()},
                "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in whole["param_groups"]],
            }
        set_optimizer_state_dict(self.module, optimizer, whole, options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        if scaler is not None and (folder / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        suffix = "" if self.is_main else f"-rank{self.rank}"
        _set_rng(torch.load(folder / f"rng{suffix}.pt", weights_only=True))
        return LoopState.from_json(written)

    def load_rank_part(self, folder: Path, optimizer: torch.optim.Optimizer) -> None:
        """After the one-process restore (rank 0's part), a rank > 0 takes its own optimizer state (a DDP
        checkpoint; FSDP wrote one whole state, already loaded) and RNG."""
        if self.is_main:
            return
        if (folder / f"optimizer-rank{self.rank}.pt").is_file():
            optimizer.load_state_dict(
                torch.load(folder / f"optimizer-rank{self.rank}.pt", map_location=self.device, weights_only=True)
            )
        _set_rng(torch.load(folder / f"rng-rank{self.rank}.pt", weights_only=True))


class LossModule(torch.nn.Module):
    """The summed loss as one module, so the distributed wrapper sees the whole forward pass: the fast path calls
    the decoder and the output layer directly, which the PEFT model's own forward would not."""

    def __init__(self, loss_fn: Any) -> None:
        super().__init__()
        self.model = loss_fn.model
        self.loss_fn = loss_fn
        # What accelerate's FSDP wrapping reads from a transformers model: one shard unit per decoder layer, and the
        # embeddings and the output layer in units of their own.
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._no_split_modules = getattr(inner, "_no_split_modules", None)
        self.inner = [inner]  # a list, so the module is not registered twice

    def get_input_embeddings(self) -> Any:
        return self.inner[0].get_input_embeddings()

    def get_output_embeddings(self) -> Any:
        return self.inner[0].get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        tokens = int(input_ids.numel())
        batch = Batch(input_ids, attention_mask, position_ids, targets, tokens, int((targets != IGNORE).sum()))
        return self.loss_fn(batch)


def stand_in(batch: Batch) -> Batch:
    """A rank whose share of a micro-batch is empty (a short last batch) still runs a pass, so every rank joins
    the gradient all-reduce: on a real example, with nothing trained, so it adds zero."""
    untrained = torch.full_like(batch.targets, IGNORE)
    return Batch(batch.input_ids, batch.attention_mask, batch.position_ids, untrained, 0, 0)


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _publish_folder(partial: Path, final: Path) -> None:
    for path in partial.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():  # re-written after a resume: same step, same place
        old = temporary_sibling(final)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(final)


# ------------------------------------------------------------------------------------------------ reporting


class RankReporter(JobReporter):
    """The job's reporter on one rank: rank 0 writes, the others stay silent, and all agree on stopping."""

    def __init__(self, control: RelayedControl, session_factory: Any, *, model_id: str, distribution: Distribution):
        super().__init__(control, session_factory, model_id=model_id)
        self.distribution = distribution

    def event(self, message: str, **kwargs: Any) -> None:
        if self.distribution.is_main:
            super().event(message, **kwargs)

    def update(self, **job_values: Any) -> None:
        if self.distribution.is_main:
            super().update(**job_values)

    def should_stop(self) -> StopReason | None:
        local = super().should_stop() if self.distribution.is_main else None
        return self.distribution.agree_on_stop(local)

    def on_log(self, metrics: dict[str, Any]) -> None:
        if self.distribution.is_main:
            super().on_log(metrics)

    def on_checkpoint(self, step: int, folder: Path, metrics: dict[str, Any]) -> None:
        if self.distribution.is_main:
            super().on_checkpoint(step, folder, metrics)

    def latest_checkpoint(self) -> Path | None:
        found = super().latest_checkpoint() if self.distribution.is_main else None
        shared = self.distribution.share(str(found) if found else None)
        return Path(shared) if shared else None


# ------------------------------------------------------------------------------------------------ entry point


def shard_on_cpu(accelerator: Any) -> None:
    """FSDP2 on CPU ranks (gloo), from the same accelerate config that gives FSDP on GPUs.

    accelerate 1.16 turns FSDP on only for accelerator devices: a CPU process group stays MULTI_CPU and the
    config's FSDP plugin is dropped without a word, so the job would train as DDP. torch's ``fully_shard`` runs on
    CPU with gloo, so the accelerator is switched to FSDP with the config's plugin and ``prepare`` then shards the
    model exactly as it does on GPUs. FSDP1 is not: ``worker.launch`` refuses it on CPU before launching.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return  # accelerate set FSDP up itself (GPUs), or there is no process group
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as accelerate reads them
    if plugin.fsdp_version != 2:
        raise PipelineError("devices_unavailable", "FSDP1 does not run on CPU processes; set fsdp_version: 2")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _read_spec(job_id: str, settings: Any, sessions: Any) -> Any:
    from core.ids import Prefix, parse_public_id
    from core.orm import FineTuningJob
    from worker.spec import JobSpec

    key = parse_public_id(job_id, Prefix.JOB)
    with sessions() as session:
        row = session.get(FineTuningJob, key)
        if row is None:
            raise PipelineError("job_not_found", f"{job_id} is gone")
        return JobSpec.from_row(row, settings)


def _write_outcome(folder: Path, rank: int, outcome: dict[str, Any]) -> None:
    path = outcome_file(folder, rank)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(outcome))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.pipeline.distributed")
    parser.add_argument("job_id")
    parser.add_argument("--owner", required=True)
    parser.add_argument("--control", required=True, type=Path)
    args = parser.parse_args(argv)
    die_with_parent(9)  # SIGKILL: a rank never outlives its launcher

    from accelerate import Accelerator

    from core.contracts import fine_tuned_model_id
    from core.db import get_sessionmaker
    from core.logging import configure_logging
    from core.settings import get_settings
    from worker.pipeline.recipe import run_pipeline

    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    refused: PipelineError | None = None
    try:
        shard_on_cpu(accelerator)
    except PipelineError as exc:
        refused = exc
    distribution = Distribution(accelerator)
    started_file(args.control, distribution.rank).touch()
    sessions = get_sessionmaker()
    outcome: dict[str, Any]
    status = 1  # anything but an agreed stop or success: the launcher then stops the other ranks
    try:
        if refused is not None:
            raise refused
        spec = _read_spec(args.job_id, settings, sessions)
        control = RelayedControl(spec.job_id, args.owner, args.control)
        model_id = fine_tuned_model_id(spec.model, spec.suffix, spec.public_id)
        reporter = RankReporter(control, sessions, model_id=model_id, distribution=distribution)
        run_pipeline(spec, reporter, sessions, settings, distribution=distribution)
        outcome, status = {"outcome": "succeeded"}, 0
    except TrainingStopped as stop:
        outcome, status = {"outcome": "stopped", "reason": stop.reason, "checkpoint_step": stop.checkpoint_step}, 0
    except LeaseLost:
        outcome = {"outcome": "stopped", "reason": "lease_lost"}
    except PipelineError as exc:
        outcome = {"outcome": "failed", "error": exc.to_error()}
    except Exception as exc:
        log.exception("rank.crashed", extra={"job_id": args.job_id, "rank": distribution.rank})
        oom = isinstance(exc, torch.OutOfMemoryError | MemoryError)
        outcome = {"outcome": "crashed", "kind": type(exc).__name__, "out_of_memory": oom, "peer_lost": peer_lost(exc)}
    _write_outcome(args.control, distribution.rank, outcome)
    if status == 0 and torch.distributed.is_initialized():
        _leave_process_group(distribution.rank, status)
    return status


def peer_lost(exc: BaseException) -> bool:
    """The error only says that a collective lost its peer: torch.distributed's own errors, or one raised by gloo's
    TCP transport (DDP's gradient hooks pass it on as a plain RuntimeError: "gloo/transport/tcp/pair.cc: Read
    error ... Connection reset by peer")."""
    return isinstance(exc, torch.distributed.DistError) or "gloo/transport/" in str(exc)


def _leave_process_group(rank: int, status: int) -> None:
    """Destroy the process group, within ``LEAVE_GROUP_SECONDS``. ``destroy_process_group`` now and then never
    returns (pytorch/pytorch#75097); the outcome is written by then, so a rank stuck there exits without it rather
    than holding the job's launcher, and with it the worker, forever."""
    leaving = threading.Thread(target=torch.distributed.destroy_process_group, name="leave-group", daemon=True)
    leaving.start()
    leaving.join(LEAVE_GROUP_SECONDS)
    if leaving.is_alive():
        log.warning("rank.leave_group_stuck", extra={"rank": rank, "after_seconds": LEAVE_GROUP_SECONDS})
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
