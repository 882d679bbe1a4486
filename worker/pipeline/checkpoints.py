"""Training checkpoints: adapter, optimizer, scheduler and RNG state, written whole or not at all.

A checkpoint folder is written under a temporary name and renamed into place once every file is on disk, and
``state.json`` is the last file written, so a folder that exists under its final name is complete. Only tensors
and plain containers are saved, and they are read back with ``torch.load(weights_only=True)``: no pickled code.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.storage import atomic_directory, remove_stale_temporaries

STATE_FILE = "state.json"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class LoopState:
    """Where the loop stands after ``step`` optimizer steps (everything else needed to continue exactly)."""

    step: int = 0
    total_steps: int = 0
    tokens_seen: int = 0  # non-pad tokens through the model so far
    epoch_loss_sum: float = 0.0  # token-weighted training loss of the current epoch
    epoch_targets: int = 0
    last_epoch_loss: float | None = None
    eval_loss: float | None = None
    data_fingerprint: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # eval results by epoch

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LoopState:
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / ADAPTER_FILE).is_file()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    root: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write checkpoint ``step-N`` under ``root`` atomically and return its final path."""
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    final = root / checkpoint_name(state.step)
    with atomic_directory(final) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=1))
    return final


def load_checkpoint(
    folder: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
) -> LoopState:
    """Restore everything ``save_checkpoint`` wrote into live objects; returns the loop state."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not is_complete(folder):
        raise FileNotFoundError(f"checkpoint {folder} is incomplete")
    device = next(p.device for p in model.parameters())
    set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_FILE), device=str(device)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    return LoopState.from_json(json.loads((folder / STATE_FILE).read_text()))


def read_state(folder: Path) -> LoopState:
    return LoopState.from_json(json.loads((folder / STATE_FILE).read_text()))


def remove_checkpoint(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
