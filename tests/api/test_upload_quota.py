"""Per-tenant upload quotas: past MAX_FILES_PER_TENANT files or MAX_FILE_BYTES_PER_TENANT bytes an upload is
refused with 429 naming the quota and the usage, nothing is written, other tenants' files, jobs' result files and
deleted files do not count, deleting a file frees room, and concurrent uploads at the edge cannot both slip past."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from api.services.files import lock_tenant_files
from core.contracts import JobStatus
from core.db import get_sessionmaker, session_scope
from core.jobs import LOCK_NAMESPACE
from core.orm import FileObject, IdempotencyRecord, utcnow
from tests.api.conftest import UploadFn
from tests.api.helpers import assert_envelope, count_rows, dir_entries, make_client
from tests.factories import alpaca_records, jsonl, make_file, make_job
from tests.polling import wait_until

DATASET = jsonl(alpaca_records(4))


def test_file_count_quota_refuses_with_429_and_writes_nothing(
    clean_db: None, upload: UploadFn, files_dir: Path
) -> None:
    with session_scope() as session:
        make_file(session, tenant_id="other")  # another tenant's file is not counted against this one
        make_file(session).purpose = "fine-tune-results"  # nor is a job's result file
    with make_client(MAX_FILES_PER_TENANT="2") as client:
        first = upload(DATASET, via=client, headers={"Idempotency-Key": "first"})
        second = upload(DATASET, via=client)
        assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
        before = dir_entries(files_dir)

        error = assert_envelope(upload(DATASET, via=client), 429, param="file", code="file_count_quota_exceeded")
        assert "2 files stored" in error["message"] and "MAX_FILES_PER_TENANT" in error["message"]
        assert count_rows(FileObject) == 4 and dir_entries(files_dir) == before

        # A retry of an upload that was accepted still gets its answer back, quota or not.
        replay = upload(DATASET, via=client, headers={"Idempotency-Key": "first"})
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]

        # Deleting a file frees its slot.
        assert client.delete(f"/v1/files/{second.json()['id']}").status_code == 200
        assert upload(DATASET, via=client).status_code == 200


def test_file_bytes_quota_counts_stored_bytes_not_deleted_ones(
    clean_db: None, upload: UploadFn, files_dir: Path
) -> None:
    limit = 2 * len(DATASET) + 10
    with make_client(MAX_FILE_BYTES_PER_TENANT=str(limit)) as client:
        kept = upload(DATASET, via=client)
        doomed = upload(DATASET, via=client)
        assert kept.status_code == 200 and doomed.status_code == 200
        before = dir_entries(files_dir)

        error = assert_envelope(upload(DATASET, via=client), 429, param="file", code="file_bytes_quota_exceeded")
        assert f"{2 * len(DATASET)} bytes stored" in error["message"] and str(limit) in error["message"]
        assert count_rows(FileObject) == 2 and dir_entries(files_dir) == before

        # A finished job names the file, so deleting it keeps the row (status deleted) but not its bytes or quota.
        with session_scope() as session:
            row = session.get(FileObject, uuid.UUID(hex=doomed.json()["id"].removeprefix("file-")))
            make_job(session, row, status=JobStatus.SUCCEEDED)
        assert client.delete(f"/v1/files/{doomed.json()['id']}").status_code == 200
        assert upload(DATASET, via=client).status_code == 200
        assert count_rows(FileObject) == 3


def _waiting_for_advisory_locks() -> int:
    """Sessions of this test database waiting for one of Conch's advisory locks (other runs share the server)."""
    query = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = :namespace "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    with session_scope() as session:
        return int(session.scalar(query, {"namespace": LOCK_NAMESPACE}) or 0)


def test_concurrent_uploads_at_the_edge_of_the_quota_cannot_both_pass(
    clean_db: None, upload: UploadFn, files_dir: Path
) -> None:
    racers = 3
    with make_client(MAX_FILES_PER_TENANT="1") as client:
        # Hold the tenant's quota lock so every upload gets past the first look and then waits at the decisive
        # count: all of them see zero files until the lock is let go.
        holder = get_sessionmaker()()
        lock_tenant_files(holder, "default")
        answers: list[Any] = []

        def send() -> None:
            answers.append(upload(DATASET, via=client))

        threads = [threading.Thread(target=send) for _ in range(racers)]
        try:
            for thread in threads:
                thread.start()
            wait_until(lambda: _waiting_for_advisory_locks() == racers, "every upload waiting on the quota lock")
        finally:
            holder.rollback()
            holder.close()
        for thread in threads:
            thread.join(timeout=60)

        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200, 429, 429], [a.text for a in answers]
        for answer in answers:
            if answer.status_code == 429:
                assert_envelope(answer, 429, code="file_count_quota_exceeded")
        assert count_rows(FileObject) == 1
        stored = {p.name for p in files_dir.iterdir()}
        with session_scope() as session:
            (path,) = session.scalars(select(FileObject.storage_path))
        assert Path(path).name in stored and not any(name.startswith(".upload-") for name in stored)


def test_expired_idempotency_key_is_not_replayed(client: TestClient, upload: UploadFn) -> None:
    first = upload(DATASET, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 200
    with session_scope() as session:
        session.execute(update(IdempotencyRecord).values(created_at=utcnow() - timedelta(hours=25)))
    again = upload(DATASET, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert count_rows(IdempotencyRecord) == 1 and count_rows(FileObject) == 2
    # The new answer is the one remembered now.
    replay = upload(DATASET, headers={"Idempotency-Key": "k1"})
    assert replay.headers.get("Idempotent-Replayed") == "true" and replay.json()["id"] == again.json()["id"]
