"""Where artifacts live, and publishing them atomically so a reader never sees half a model."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.settings import Settings


def _root(settings: Settings) -> Path:
    return settings.artifacts


def files_dir(settings: Settings) -> Path:
    return _root(settings) / "files"


def job_dir(job_id: uuid.UUID | str, settings: Settings) -> Path:
    key = job_id.hex if isinstance(job_id, uuid.UUID) else job_id
    return _root(settings) / "jobs" / key


def checkpoints_dir(job_id: uuid.UUID | str, settings: Settings) -> Path:
    return job_dir(job_id, settings) / "checkpoints"


def fine_tuned_dir(job_id: uuid.UUID | str, settings: Settings) -> Path:
    key = job_id.hex if isinstance(job_id, uuid.UUID) else job_id
    return _root(settings) / "models" / key


def base_models_dir(settings: Settings) -> Path:
    return settings.base_model_store


def temporary_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final`` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = temporary_sibling(final)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            # Weight files come out 0600 from some writers; other service users must read them.
            path.chmod(0o644)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def directory_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def remove_stale_temporaries(parent: Path) -> None:
    """Drop leftovers of writers that died before their rename."""
    if parent.is_dir():
        for child in parent.glob(".*.tmp-*"):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
