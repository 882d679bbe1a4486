"""The runner in this process against the real database: claim, pre-flight report, progress, publish, errors,
cancel, a lost lease and duplicate deliveries."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.db import session_scope
from core.jobs import request_cancel
from core.orm import Checkpoint, Deployment, FineTuningJob, JobEvent, ModelRecord
from core.settings import get_settings
from core.storage import directory_size, fine_tuned_dir
from tests.factories import alpaca_records, fresh, job_events, make_file, make_job, metrics_events
from tests.worker.helpers import assert_cancelled_without_trace
from worker.runner import run_job

pytestmark = pytest.mark.usefixtures("tiny_models")

LONG_RUN = {"num_train_epochs": 6, "per_device_train_batch_size": 1, "save_steps": 10}


def start_in_thread(public_id: str) -> tuple[threading.Thread, dict[str, str]]:
    outcome: dict[str, str] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_job(public_id, get_settings())), daemon=True)
    thread.start()
    return thread, outcome


def wait_for_metrics(db: Session, job: FineTuningJob, count: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(metrics_events(db, job)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("training did not start")


def test_a_job_trains_reports_and_publishes(db: Session) -> None:
    file = make_file(db, alpaca_records(8))
    job = make_job(db, file, auto_deploy=True)
    db.commit()

    assert run_job(job.public_id, get_settings()) == "succeeded"

    row = fresh(db, job)
    model_id = f"ft:tiny-llama:t:{job.public_id}"
    assert row.status == JobStatus.SUCCEEDED and row.error is None and row.fine_tuned_model == model_id
    assert row.attempts == 1 and row.lease_owner is None
    assert row.trained_tokens and row.trained_tokens > 0
    assert row.metrics and row.metrics["steps"] == 8 and row.metrics["train_loss"] > 0
    assert row.progress and row.progress["percent"] == 100.0 and row.progress["step"] == 8

    messages = [e.message for e in job_events(db, job)]
    report = next(m for m in messages if m.startswith("Training data:"))
    assert "8 examples" in report and "trained" in report and "0 truncated" in report
    assert any("⟪<|im_start|>user" in m and "⟫My name is Shellby" in m for m in messages)
    plan = next(e for e in job_events(db, job) if e.message.startswith("Plan:"))
    assert plan.data and plan.data["total_steps"] == 8 and "estimated_seconds" in plan.data

    steps = metrics_events(db, job)
    assert [m["step"] for m in steps] == list(range(1, 9))
    for data in steps:
        assert set(data) >= {
            "step",
            "total_steps",
            "epoch",
            "loss",
            "learning_rate",
            "grad_norm",
            "tokens_per_second",
            "eta_seconds",
        }

    record = db.get(ModelRecord, model_id)
    folder = fine_tuned_dir(job.id, get_settings())
    assert record is not None and record.storage_path == str(folder) and record.job_id == job.id
    assert record.dataset_sha256 == file.sha256 and record.size_bytes == directory_size(folder)
    assert record.adapter_path and (Path(record.adapter_path) / "adapter_model.safetensors").is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "conch.json").is_file()
    assert not list(folder.parent.glob(".*.tmp-*"))  # nothing half-written left behind

    checkpoints = db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)).all()
    assert [c.step for c in checkpoints] == [4, 8]
    assert (
        checkpoints[-1].metrics and checkpoints[-1].metrics["fine_tuned_model_checkpoint"] == f"{model_id}:ckpt-step-8"
    )

    deployment = db.scalars(select(Deployment)).one()
    assert deployment.model_id == model_id and deployment.requested_by == job.public_id
    assert deployment.status == "pending" and deployment.tenant_id == job.tenant_id


def test_no_suffix_no_auto_deploy_and_validation_every_epoch(db: Session) -> None:
    file = make_file(db, alpaca_records(8))
    split = make_job(db, file, suffix=None, hyperparameters={"val_size": 0.25})
    validation = make_file(db, alpaca_records(4))
    separate = make_job(db, file, validation_file=validation)
    db.commit()

    assert run_job(split.public_id, get_settings()) == "succeeded"
    assert fresh(db, split).fine_tuned_model == f"ft:tiny-llama::{split.public_id}"
    assert db.scalars(select(Deployment)).first() is None
    evals = [e.data for e in job_events(db, split) if e.type == "metrics" and "eval_loss" in (e.data or {})]
    assert [d["epoch"] for d in evals] == [1.0, 2.0]
    # Each evaluation is announced as the job's stage, and training (then merging) follows it.
    stages = [(e.data or {}).get("stage") for e in job_events(db, split) if (e.data or {}).get("stage")]
    assert stages.count("evaluating") == 2
    assert stages.index("merging") > max(i for i, stage in enumerate(stages) if stage == "evaluating")
    assert fresh(db, split).metrics["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-4)

    assert run_job(separate.public_id, get_settings()) == "succeeded"
    evals = [e.data for e in job_events(db, separate) if e.type == "metrics" and "eval_loss" in (e.data or {})]
    assert len(evals) == 2
    assert any(e.message.startswith("Validation data: 4 examples") for e in job_events(db, separate))


def test_fp16_on_a_cpu_fails_the_job_with_a_clear_error(db: Session) -> None:
    job = make_job(db, make_file(db, alpaca_records(4)), hyperparameters={"compute_type": "fp16"})
    db.commit()
    assert run_job(job.public_id, get_settings()) == "failed"
    row = fresh(db, job)
    assert row.status == JobStatus.FAILED and row.lease_owner is None
    assert row.error is not None
    assert row.error["code"] == "unsupported_compute_type" and row.error["param"] == "compute_type"
    assert "fp16" in row.error["message"]
    assert job_events(db, job)[-1].level == "error"


def test_an_internal_error_fails_the_job_without_a_traceback(
    db: Session, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_models["tiny-llama"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        source = tiny_models["tiny-llama"] / name
        if source.exists():
            (broken / name).write_bytes(source.read_bytes())
    settings = get_settings().model_copy(update={"base_models": {"broken": str(broken)}})
    job = make_job(db, make_file(db, alpaca_records(4)), model="broken")
    missing = make_job(db, make_file(db, alpaca_records(4)), model="not-configured")
    db.commit()

    assert run_job(job.public_id, settings) == "failed"
    error = fresh(db, job).error
    assert error is not None and error["code"] == "internal_error" and error["param"] is None
    assert "Traceback" not in error["message"] and str(broken) not in error["message"]

    assert run_job(missing.public_id, settings) == "failed"
    error = fresh(db, missing).error
    assert error is not None and (error["code"], error["param"]) == ("model_not_available", "model")


def test_a_missing_dataset_file_fails_the_job(db: Session) -> None:
    file = make_file(db, alpaca_records(4))
    job = make_job(db, file)
    db.commit()
    Path(file.storage_path).unlink()
    assert run_job(job.public_id, get_settings()) == "failed"
    error = fresh(db, job).error
    assert error is not None and (error["code"], error["param"]) == ("file_not_found", "training_file")


def test_a_second_delivery_is_refused_and_writes_nothing(db: Session) -> None:
    job = make_job(db, make_file(db, alpaca_records(4)), hyperparameters={"num_train_epochs": 1})
    db.commit()
    assert run_job(job.public_id, get_settings()) == "succeeded"
    before = len(job_events(db, job))
    assert run_job(job.public_id, get_settings()) == "skipped"
    assert len(job_events(db, job)) == before and fresh(db, job).attempts == 1
    assert run_job("ftjob-" + uuid.uuid4().hex, get_settings()) == "skipped"
    assert run_job("not-a-job-id", get_settings()) == "invalid"


def test_cancel_stops_training_cleans_up_and_ends_once(db: Session) -> None:
    job = make_job(db, make_file(db, alpaca_records(64)), hyperparameters=LONG_RUN)
    db.commit()
    thread, outcome = start_in_thread(job.public_id)
    wait_for_metrics(db, job, count=12)  # past the first checkpoint
    with session_scope() as session:
        request_cancel(session, job.id)
    thread.join(120)
    assert outcome == {"result": "cancelled"}
    row = assert_cancelled_without_trace(db, job)
    assert row.metrics is None or row.metrics.get("steps") is None
    assert len(metrics_events(db, job)) < 6 * 64
    assert [e.message for e in job_events(db, job)].count("Job cancelled") == 1
    assert db.scalars(select(ModelRecord)).first() is None


def test_a_worker_that_lost_its_lease_stops_and_writes_nothing(db: Session) -> None:
    job = make_job(db, make_file(db, alpaca_records(64)), hyperparameters=LONG_RUN)
    db.commit()
    thread, outcome = start_in_thread(job.public_id)
    wait_for_metrics(db, job, count=3)
    with session_scope() as session:  # another worker took the job over
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job.id).values(lease_owner="someone-else"))
    with session_scope() as session:
        last_seq = session.scalar(
            select(JobEvent.seq).where(JobEvent.job_id == job.id).order_by(JobEvent.seq.desc()).limit(1)
        )
    thread.join(120)
    assert outcome == {"result": "lease_lost"}
    assert [e for e in job_events(db, job) if e.seq > (last_seq or 0)] == []
    row = fresh(db, job)
    assert row.status == JobStatus.RUNNING and row.lease_owner == "someone-else"
