"""The janitor removes leftovers nothing references (on real Postgres, real files in a folder of the test's own)
and keeps everything a row names, everything of a live job and everything younger than the grace period."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.db import get_sessionmaker, session_scope
from core.janitor import JANITOR_LOCK, STORE_MARKER, UNNAMED_KINDS, sweep_once
from core.jobs import LOCK_NAMESPACE
from core.orm import Checkpoint, FileObject, IdempotencyRecord, StoreIdentity, utcnow
from core.settings import Settings, get_settings
from core.storage import checkpoints_dir, files_dir, fine_tuned_dir, job_dir, temporary_sibling
from tests.factories import make_checkpoint, make_file, make_job, make_model, minutes_ago
from tests.polling import wait_until
from worker import reconciler

GRACE = 3600.0
OLD = 2 * GRACE  # seconds back that "old" leftovers were last written


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return get_settings().model_copy(
        update={
            "artifact_root": tmp_path / "artifacts",
            "gguf_cache": tmp_path / "gguf",
            "janitor_grace_seconds": GRACE,
            "idempotency_ttl_seconds": 24 * 3600.0,
        }
    )


def age(path: Path, seconds: float = OLD) -> Path:
    """Set the modification time of ``path`` (and all its tree) ``seconds`` back."""
    moment = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (moment, moment))
    return path


def folder_with_file(folder: Path, name: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x" * 64)
    return folder


def checkpoint_folder(job_id: uuid.UUID, settings: Settings) -> Path:
    return folder_with_file(checkpoints_dir(job_id, settings) / "checkpoint-2")


def test_failed_and_cancelled_jobs_checkpoints_go_after_the_grace_others_stay(db: Session, settings: Settings) -> None:
    failed = make_job(db, status=JobStatus.FAILED, finished_at=minutes_ago(180))
    cancelled = make_job(db, status=JobStatus.CANCELLED, finished_at=minutes_ago(180))
    failed_recently = make_job(db, status=JobStatus.FAILED, finished_at=minutes_ago(10))
    succeeded = make_job(db, status=JobStatus.SUCCEEDED, finished_at=minutes_ago(180))
    running = make_job(db, status=JobStatus.RUNNING, lease_owner="w", lease_expires_at=utcnow())
    for job in (failed, cancelled, failed_recently, succeeded, running):
        checkpoint_folder(job.id, settings)
        make_checkpoint(db, job.id, 2)
        age(job_dir(job.id, settings))
    orphan = age(folder_with_file(job_dir(uuid.uuid4(), settings)))
    young_orphan = folder_with_file(job_dir(uuid.uuid4(), settings))
    not_ours = age(folder_with_file(settings.artifacts / "jobs" / "notes"))
    db.commit()

    counts = sweep_once(settings)

    assert counts["failed_job_checkpoints"] == 2 and counts["orphaned_job_folders"] == 1
    assert not job_dir(failed.id, settings).exists() and not job_dir(cancelled.id, settings).exists()
    assert not orphan.exists()
    for kept in (failed_recently, succeeded, running):
        assert job_dir(kept.id, settings).is_dir()
    assert young_orphan.is_dir() and not_ours.is_dir()
    with session_scope() as session:
        left = set(session.scalars(select(Checkpoint.job_id)))
    assert left == {failed_recently.id, succeeded.id, running.id}


def test_a_failed_jobs_folder_still_being_written_stays(db: Session, settings: Settings) -> None:
    # The job was failed by the reconciler, but a worker that has not yet heard so just wrote a checkpoint.
    job = make_job(db, status=JobStatus.FAILED, finished_at=minutes_ago(180))
    folder = checkpoint_folder(job.id, settings)
    db.commit()
    assert sweep_once(settings)["failed_job_checkpoints"] == 0
    assert folder.is_dir()


def test_model_folders_no_row_names_go_referenced_live_and_young_ones_stay(db: Session, settings: Settings) -> None:
    published = make_job(db, status=JobStatus.SUCCEEDED, finished_at=minutes_ago(180))
    published_folder = age(folder_with_file(fine_tuned_dir(published.id, settings)))
    make_model(db, "ft:tiny-llama:t:published", storage_path=published_folder)
    lost_lease = make_job(db, status=JobStatus.FAILED, finished_at=minutes_ago(180))
    orphan = age(folder_with_file(fine_tuned_dir(lost_lease.id, settings)))
    no_job = age(folder_with_file(fine_tuned_dir(uuid.uuid4(), settings)))
    # Merged by a job that is still running (it has not registered its model yet), or by one just now.
    running = make_job(db, status=JobStatus.RUNNING, lease_owner="w", lease_expires_at=utcnow())
    in_flight = age(folder_with_file(fine_tuned_dir(running.id, settings)))
    young = folder_with_file(fine_tuned_dir(uuid.uuid4(), settings))
    dead_writer = age(folder_with_file(temporary_sibling(fine_tuned_dir(uuid.uuid4(), settings))))
    live_writer = folder_with_file(temporary_sibling(fine_tuned_dir(uuid.uuid4(), settings)))
    not_ours = age(folder_with_file(settings.artifacts / "models" / "README"))
    db.commit()

    counts = sweep_once(settings)

    assert counts["orphaned_models"] == 2 and counts["model_temporaries"] == 1
    assert not orphan.exists() and not no_job.exists() and not dead_writer.exists()
    for kept in (published_folder, in_flight, young, live_writer, not_ours):
        assert kept.is_dir(), kept


def test_model_folder_is_matched_by_name_when_the_volume_moved(db: Session, settings: Settings) -> None:
    job = make_job(db, status=JobStatus.SUCCEEDED, finished_at=minutes_ago(180))
    folder = age(folder_with_file(fine_tuned_dir(job.id, settings)))
    make_model(db, "ft:tiny-llama:t:moved", storage_path=f"/old/mount/models/{folder.name}")
    db.commit()
    assert sweep_once(settings)["orphaned_models"] == 0
    assert folder.is_dir()


def test_upload_leftovers_go_stored_and_young_files_stay(db: Session, settings: Settings) -> None:
    folder = files_dir(settings)
    folder.mkdir(parents=True)
    killed_upload = folder / f".upload-{uuid.uuid4().hex}.tmp"
    killed_upload.write_bytes(b"half")
    age(killed_upload)
    dead_worker_result = folder / f".{uuid.uuid4().hex}.csv.tmp"
    dead_worker_result.write_bytes(b"step,loss\n")
    age(dead_worker_result)
    live_upload = folder / f".upload-{uuid.uuid4().hex}.tmp"
    live_upload.write_bytes(b"streaming")
    unreferenced = folder / f"{uuid.uuid4().hex}.jsonl"
    unreferenced.write_bytes(b"{}\n")
    age(unreferenced)
    just_stored = folder / f"{uuid.uuid4().hex}.jsonl"  # moved to its name, its row not yet committed
    just_stored.write_bytes(b"{}\n")
    stored = folder / f"{uuid.uuid4().hex}.jsonl"
    stored.write_bytes(b"{}\n")
    age(stored)
    row = make_file(db)
    row.storage_path = str(stored)
    db.commit()

    counts = sweep_once(settings)

    assert counts["upload_temporaries"] == 2 and counts["orphaned_uploads"] == 1
    assert not killed_upload.exists() and not dead_worker_result.exists() and not unreferenced.exists()
    assert live_upload.is_file() and just_stored.is_file() and stored.is_file()
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(FileObject)) == 1


def test_cached_exports_of_deleted_models_go_others_stay(db: Session, settings: Settings) -> None:
    cache = settings.gguf_cache_dir
    cache.mkdir(parents=True)
    kept_model = fine_tuned_dir(uuid.uuid4(), settings)
    make_model(db, "ft:tiny-llama:t:kept", storage_path=kept_model)
    db.commit()
    live_export = cache / f"{kept_model.name}-0123456789abcdef.q8_0.gguf"
    deleted_export = cache / f"{uuid.uuid4().hex}-0123456789abcdef.q8_0.gguf"
    deleted_reference = cache / f"{uuid.uuid4().hex}-0123456789abcdef0123.reference.json"
    young_deleted_export = cache / f"{uuid.uuid4().hex}-fedcba9876543210.bf16.gguf"
    base_export = cache / "tiny-llama-0123456789abcdef.bf16.gguf"
    half_written = cache / f".{uuid.uuid4().hex}-0123.reference.json.tmp"
    for path in (live_export, deleted_export, deleted_reference, young_deleted_export, base_export, half_written):
        path.write_bytes(b"GGUF")
    scratch = folder_with_file(cache / ".export-abc123", "f16.gguf")
    for path in (live_export, deleted_export, deleted_reference, base_export, half_written, scratch):
        age(path)

    counts = sweep_once(settings)

    assert counts["stale_exports"] == 2 and counts["export_temporaries"] == 2
    assert not deleted_export.exists() and not deleted_reference.exists()
    assert not half_written.exists() and not scratch.exists()
    assert live_export.is_file() and base_export.is_file() and young_deleted_export.is_file()


def test_expired_idempotency_records_go(db: Session, settings: Settings) -> None:
    def record(key: str, created_hours_ago: float) -> None:
        db.add(
            IdempotencyRecord(
                tenant_id="default",
                key=key,
                route="POST /v1/files",
                request_hash="0" * 64,
                status_code=200,
                response={},
                created_at=utcnow() - timedelta(hours=created_hours_ago),
            )
        )

    record("expired", 25)
    record("recent", 23)
    db.commit()
    assert sweep_once(settings)["idempotency_records"] == 1
    with session_scope() as session:
        assert list(session.scalars(select(IdempotencyRecord.key))) == ["recent"]


def test_each_removal_is_logged_with_its_kind_path_and_size(
    db: Session, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    orphan = age(folder_with_file(fine_tuned_dir(uuid.uuid4(), settings)))
    with caplog.at_level(logging.INFO, logger="conch.janitor"):
        sweep_once(settings)
    (removed,) = [r for r in caplog.records if r.getMessage() == "janitor.removed"]
    assert removed.__dict__["kind"] == "orphaned_models" and removed.__dict__["path"] == str(orphan)
    assert removed.__dict__["bytes"] == 64


def test_one_sweep_at_a_time(db: Session, settings: Settings) -> None:
    orphan = age(folder_with_file(fine_tuned_dir(uuid.uuid4(), settings)))
    holder = get_sessionmaker()()
    try:
        holder.execute(select(func.pg_advisory_xact_lock(LOCK_NAMESPACE, JANITOR_LOCK)))
        counts = sweep_once(settings)
        assert not any(counts.values()) and orphan.is_dir()
    finally:
        holder.rollback()
        holder.close()
    assert sweep_once(settings)["orphaned_models"] == 1 and not orphan.exists()


def test_the_reconciler_beside_each_worker_runs_the_janitor(db: Session, settings: Settings) -> None:
    orphan = age(folder_with_file(fine_tuned_dir(uuid.uuid4(), settings)))
    job = make_job(db, status=JobStatus.FAILED, finished_at=minutes_ago(180))
    checkpoint_folder(job.id, settings)
    checkpoints = age(job_dir(job.id, settings))
    db.commit()
    stop = threading.Event()
    looping = threading.Thread(
        target=reconciler.run, args=(settings.model_copy(update={"janitor_interval_seconds": 60.0}), stop)
    )
    looping.start()
    try:
        wait_until(lambda: not orphan.exists() and not checkpoints.exists(), "the janitor's first sweep")
    finally:
        stop.set()
        looping.join(timeout=30)
    assert not looping.is_alive()


def _unnamed_leftovers(settings: Settings) -> list[Path]:
    """A job folder, a model folder and a stored file no row names, all past the grace period."""
    stored = files_dir(settings) / f"{uuid.uuid4().hex}.jsonl"
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(b"{}\n")
    return [
        age(folder_with_file(job_dir(uuid.uuid4(), settings))),
        age(folder_with_file(fine_tuned_dir(uuid.uuid4(), settings))),
        age(stored),
    ]


def test_a_fresh_database_never_takes_an_old_stores_contents_for_leftovers(db: Session, settings: Settings) -> None:
    assert not any(sweep_once(settings).values())  # an empty store: bound to this database, nothing to remove
    marker = settings.artifacts / STORE_MARKER
    assert marker.is_file()
    # The database is replaced by an empty one (a new DATABASE_URL, a restore gone wrong) over the same volume.
    db.execute(delete(StoreIdentity))
    db.commit()
    unnamed = _unnamed_leftovers(settings)
    killed_upload = files_dir(settings) / f".upload-{uuid.uuid4().hex}.tmp"
    killed_upload.write_bytes(b"half")
    age(killed_upload)

    counts = sweep_once(settings)

    assert all(path.exists() for path in unnamed)  # unnamed is not unwanted: the rows that named them are elsewhere
    assert counts["upload_temporaries"] == 1 and not killed_upload.exists()  # the product's own temporaries go
    assert not any(counts[kind] for kind in UNNAMED_KINDS)


def test_another_installs_store_or_a_new_volume_with_content_is_left_alone(db: Session, settings: Settings) -> None:
    db.add(StoreIdentity(id=uuid.uuid4()))
    db.commit()
    unnamed = _unnamed_leftovers(settings)  # a store that never had this database's marker
    assert not any(sweep_once(settings)[kind] for kind in UNNAMED_KINDS)
    (settings.artifacts / STORE_MARKER).write_text(f"{uuid.uuid4()}\n")  # another database's store
    assert not any(sweep_once(settings)[kind] for kind in UNNAMED_KINDS)
    assert all(path.exists() for path in unnamed)
    # The operator confirms the store is this database's: the sweep goes ahead.
    with session_scope() as session:
        owned = session.scalars(select(StoreIdentity.id)).one()
    (settings.artifacts / STORE_MARKER).write_text(f"{owned}\n")
    counts = sweep_once(settings)
    assert counts["orphaned_job_folders"] == 1 and counts["orphaned_models"] == 1 and counts["orphaned_uploads"] == 1
    assert not any(path.exists() for path in unnamed)
