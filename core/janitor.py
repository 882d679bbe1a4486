"""The janitor: removes what nothing references any more, so leftovers do not fill the shared artifact volume.

What it removes, each only once it is older than ``JANITOR_GRACE_SECONDS``:

- ``jobs/<id>/`` (checkpoints) of a failed or cancelled job that ended before the grace period, with its
  checkpoint rows; a job folder whose job row is gone;
- ``models/<id>/`` with no model row naming it and no live job that could still publish it (a publish that
  lost its lease after merging), and ``models/.<id>.tmp-*`` siblings of writers that died before their rename;
- ``files/.upload-*.tmp`` of an api killed mid-upload (and result files a dead worker left half-written), and
  stored files no file row names (a worker that died between writing a job's result files and committing them);
- llama.cpp exports and reference answers in the GGUF cache (``<model folder>-*``) of models that no longer
  exist, and the cache's own half-written temporaries;
- idempotency records older than ``IDEMPOTENCY_TTL_SECONDS``.

Anything a row still names, anything of a live job, and anything younger than the grace period (a publish or an
upload in flight writes into its temporary, so its newest file is young) stays. Ages on disk are modification
times (the newest in a folder's tree) against this host's clock; ages of rows use the database's clock. Only
names this product writes are touched (32-hex ids, its temporaries); anything else in those folders is left
alone. Every removal is one ``janitor.removed`` log line.

What no row names is a leftover only if the store belongs to this database: the first sweep writes one id into
the database (``store_identity``) and into the store (``ARTIFACT_ROOT/.conch-store``). Where they differ or one is
missing (a fresh database pointed at an old volume, a volume from another install), the sweep removes only
what the rows themselves say is done with (failed jobs' checkpoints) and the product's own temporaries, and logs
``janitor.store_unrecognised``; nothing merely unnamed is touched.

The reconciler beside each worker runs it every ``JANITOR_INTERVAL_SECONDS``; on Postgres a sweep runs only
while it holds an advisory lock, so one sweeps at a time.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.contracts import LIVE_STATUSES, JobStatus
from core.db import session_scope
from core.jobs import LOCK_NAMESPACE, db_now, is_postgres
from core.orm import Checkpoint, FileObject, FineTuningJob, IdempotencyRecord, ModelRecord, StoreIdentity
from core.settings import Settings
from core.storage import files_dir

log = logging.getLogger("conch.janitor")

JANITOR_LOCK = 2  # second key of the janitor's advisory lock (the first is core.jobs.LOCK_NAMESPACE)
ENDED_UNPUBLISHED = (JobStatus.FAILED, JobStatus.CANCELLED)

_ID = re.compile(r"^[0-9a-f]{32}$")
_STORED_FILE = re.compile(r"^[0-9a-f]{32}\.[a-z0-9]+$")
# An upload being received (api.http.uploads), a job's result file being written (worker.pipeline.results).
_FILE_TEMPORARY = re.compile(r"^\.(upload-[0-9a-f]+|[0-9a-f]{32}\.[a-z0-9]+)\.tmp$")
_SIBLING_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]+$")  # core.storage.temporary_sibling
_CACHED_EXPORT = re.compile(r"^([0-9a-f]{32})-.+")
_CACHE_TEMPORARY = re.compile(r"^\.(export-.+|.+\.tmp)$")  # artifacts.gguf's scratch, inference.gate's

STORE_MARKER = ".conch-store"
# Kinds removed only because no row names them: never from a store this database does not own.
UNNAMED_KINDS = frozenset({"orphaned_job_folders", "orphaned_models", "orphaned_uploads", "stale_exports"})

# The kinds of leftover, as counted and logged.
KINDS = (
    "failed_job_checkpoints",
    "orphaned_job_folders",
    "orphaned_models",
    "model_temporaries",
    "upload_temporaries",
    "orphaned_uploads",
    "stale_exports",
    "export_temporaries",
    "idempotency_records",
)


@dataclass(frozen=True)
class Leftover:
    kind: str
    path: Path


def newest_mtime(path: Path) -> float:
    """When anything in ``path`` (a file, or a folder's whole tree) last changed."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for child in path.rglob("*"):
                try:
                    newest = max(newest, child.lstat().st_mtime)
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return time.time()  # gone meanwhile: treat as young, there is nothing to remove
    return newest


def _children(folder: Path) -> Iterator[Path]:
    if folder.is_dir():
        yield from sorted(folder.iterdir())


def _take_lock(session: Session) -> bool:
    """Held until the sweep's transaction ends; False while another process sweeps."""
    if not is_postgres(session):
        return True
    return bool(session.execute(select(func.pg_try_advisory_xact_lock(LOCK_NAMESPACE, JANITOR_LOCK))).scalar_one())


def _store_is_ours(session: Session, settings: Settings) -> bool:
    """Whether the artifact store belongs to this database; binds the two on the first sweep of an empty pair."""
    marker = settings.artifacts / STORE_MARKER
    owned = session.scalars(select(StoreIdentity.id)).all()
    try:
        written = uuid.UUID(marker.read_text().strip()) if marker.is_file() else None
    except ValueError:
        written = None
    if written is not None and written in owned:
        return True
    store_is_empty = not any(any(_children(settings.artifacts / part)) for part in ("jobs", "models", "files"))
    if written is None and (not owned or store_is_empty):
        # A database that never swept (an install older than the marker, or a new one) with no marker yet, or an
        # empty volume: nothing in the store can belong to another database. Bind them.
        identity = owned[0] if owned else uuid.uuid4()
        if not owned:
            session.add(StoreIdentity(id=identity))
            session.flush()
        settings.artifacts.mkdir(parents=True, exist_ok=True)
        partial = marker.with_name(f"{STORE_MARKER}.tmp")
        partial.write_text(f"{identity}\n")
        partial.replace(marker)
        return True
    log.warning(
        "janitor.store_unrecognised",
        extra={
            "store": str(settings.artifacts),
            "store_id": str(written) if written else None,
            "database_ids": [str(i) for i in owned],
            "hint": f"only if this store is this database's, write one of database_ids into {STORE_MARKER}",
        },
    )
    return False


def _job_folders(session: Session, settings: Settings, now: datetime, old: float) -> list[Leftover]:
    root = settings.artifacts / "jobs"
    folders = {uuid.UUID(hex=p.name): p for p in _children(root) if _ID.match(p.name) and p.is_dir()}
    if not folders:
        return []
    rows = session.execute(
        select(FineTuningJob.id, FineTuningJob.status, FineTuningJob.finished_at).where(
            FineTuningJob.id.in_(list(folders))
        )
    ).all()
    known = {row.id: row for row in rows}
    ended_before = now - timedelta(seconds=settings.janitor_grace_seconds)
    found: list[Leftover] = []
    for job_id, folder in folders.items():
        if newest_mtime(folder) > old:
            continue  # something wrote here recently (a worker that has not yet heard it lost its lease)
        row = known.get(job_id)
        if row is None:
            found.append(Leftover("orphaned_job_folders", folder))
        elif row.status in ENDED_UNPUBLISHED and row.finished_at is not None and row.finished_at < ended_before:
            found.append(Leftover("failed_job_checkpoints", folder))
    return found


def _forget_checkpoints_of_ended_jobs(session: Session, settings: Settings, now: datetime) -> None:
    """Checkpoint rows of failed or cancelled jobs past the grace period name folders the sweep removes."""
    ended = select(FineTuningJob.id).where(
        FineTuningJob.status.in_(ENDED_UNPUBLISHED),
        FineTuningJob.finished_at < now - timedelta(seconds=settings.janitor_grace_seconds),
    )
    session.execute(delete(Checkpoint).where(Checkpoint.job_id.in_(ended)).execution_options(synchronize_session=False))


def _model_folder_names(session: Session) -> set[str]:
    # Names, not whole paths: a volume mounted at another path must not make every model look unreferenced.
    return {Path(p).name for p in session.scalars(select(ModelRecord.storage_path))}


def _model_folders(session: Session, settings: Settings, old: float) -> list[Leftover]:
    root = settings.artifacts / "models"
    entries = list(_children(root))
    if not entries:
        return []
    referenced = _model_folder_names(session)
    candidates = {uuid.UUID(hex=p.name): p for p in entries if _ID.match(p.name) and p.name not in referenced}
    live = set(
        session.scalars(
            select(FineTuningJob.id).where(
                FineTuningJob.id.in_(list(candidates)), FineTuningJob.status.in_(LIVE_STATUSES)
            )
        )
        if candidates
        else []
    )
    found: list[Leftover] = []
    for entry in entries:
        if _SIBLING_TEMPORARY.match(entry.name) and newest_mtime(entry) <= old:
            found.append(Leftover("model_temporaries", entry))
    for job_id, folder in candidates.items():
        if job_id not in live and newest_mtime(folder) <= old:
            found.append(Leftover("orphaned_models", folder))
    return found


def _upload_leftovers(session: Session, settings: Settings, old: float) -> list[Leftover]:
    entries = [p for p in _children(files_dir(settings)) if p.is_file()]
    if not entries:
        return []
    found: list[Leftover] = []
    stored = [p for p in entries if _STORED_FILE.match(p.name)]
    referenced = {Path(p).name for p in session.scalars(select(FileObject.storage_path))} if stored else set()
    for entry in entries:
        if _FILE_TEMPORARY.match(entry.name) and newest_mtime(entry) <= old:
            found.append(Leftover("upload_temporaries", entry))
    for entry in stored:
        if entry.name not in referenced and newest_mtime(entry) <= old:
            found.append(Leftover("orphaned_uploads", entry))
    return found


def _cache_leftovers(session: Session, settings: Settings, old: float) -> list[Leftover]:
    entries = list(_children(settings.gguf_cache_dir))
    if not entries:
        return []
    # Exports are named after the model folder; base models' folders are kept whatever their names.
    live = _model_folder_names(session) | {Path(spec).name for spec in settings.base_models.values()}
    live |= {p.name for p in _children(settings.base_model_store)}
    found: list[Leftover] = []
    for entry in entries:
        if newest_mtime(entry) > old:
            continue
        if _CACHE_TEMPORARY.match(entry.name):
            found.append(Leftover("export_temporaries", entry))
            continue
        match = _CACHED_EXPORT.match(entry.name)
        if match and match.group(1) not in live:
            found.append(Leftover("stale_exports", entry))
    return found


def _expired_idempotency_records(session: Session, settings: Settings, now: datetime) -> int:
    cutoff = now - timedelta(seconds=settings.idempotency_ttl_seconds)
    result = session.execute(
        delete(IdempotencyRecord)
        .where(IdempotencyRecord.created_at < cutoff)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remove(leftover: Leftover, roots: Iterable[Path]) -> bool:
    path = leftover.path
    # Only ever inside the folders swept, never one of them itself, whatever a name looked like.
    if not any(path.is_relative_to(root) and path != root for root in roots):
        log.warning("janitor.refused", extra={"kind": leftover.kind, "path": str(path)})
        return False
    size = _size(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    log.info("janitor.removed", extra={"kind": leftover.kind, "path": str(path), "bytes": size})
    return True


def sweep_once(settings: Settings) -> dict[str, int]:
    """One sweep; returns how many leftovers of each kind it removed (nothing if another process sweeps)."""
    counts = dict.fromkeys(KINDS, 0)
    with session_scope() as session:
        if not _take_lock(session):
            log.debug("janitor.skipped_locked")
            return counts
        now = db_now(session)
        old = time.time() - settings.janitor_grace_seconds
        leftovers = _job_folders(session, settings, now, old)
        leftovers += _model_folders(session, settings, old)
        leftovers += _upload_leftovers(session, settings, old)
        leftovers += _cache_leftovers(session, settings, old)
        _forget_checkpoints_of_ended_jobs(session, settings, now)
        counts["idempotency_records"] = _expired_idempotency_records(session, settings, now)
        # Removed while the lock is held (the rows above commit after), so two sweeps never race on a folder.
        roots = (settings.artifacts, settings.gguf_cache_dir)
        # Checked (and on the first sweep bound) every time, so a later swap of database or volume is noticed.
        if not _store_is_ours(session, settings):
            leftovers = [leftover for leftover in leftovers if leftover.kind not in UNNAMED_KINDS]
        for leftover in leftovers:
            if _remove(leftover, roots):
                counts[leftover.kind] += 1
    if any(counts.values()):
        log.info("janitor.swept", extra=counts)
    return counts
