"""Continuing from a fine-tuned model or one of its checkpoints, and the result files a finished job gets: the
runner in this process on the real database and a tiny model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.models import get_model
from core.contracts import Hyperparameters, JobStatus
from core.datasets import load_conversations
from core.ids import Prefix, parse_public_id
from core.orm import FileObject, FineTuningJob, ModelRecord
from core.settings import get_settings
from core.storage import fine_tuned_dir, job_dir
from tests.factories import TINY_HP, alpaca_records, fresh, make_file, make_job, metrics_events
from worker.pipeline.data import pad_batch, prepare_data
from worker.pipeline.device import resolve_compute
from worker.pipeline.results import COLUMNS, CURVE_DPI, CURVE_SIZE_INCHES
from worker.pipeline.train import LossFunction
from worker.runner import run_job

pytestmark = pytest.mark.usefixtures("tiny_models")

# fp32 everywhere, so the model as published can be compared with the model as trained.
HP = {"compute_type": "fp32", "learning_rate": 1e-2}


def result_files(db: Session, job: FineTuningJob) -> dict[str, FileObject]:
    ids = fresh(db, job).result_files or []
    rows = [db.get(FileObject, parse_public_id(i, Prefix.FILE)) for i in ids]
    assert all(rows), ids
    return {r.filename: r for r in rows if r is not None}


def first_step_loss(db: Session, job: FineTuningJob) -> float:
    return float(next(m["loss"] for m in metrics_events(db, job) if m["step"] == 1))


def published_eval_loss(folder: Path, training: FileObject, validation: FileObject, hp: dict[str, Any]) -> float:
    """The validation loss of the published (merged) folder, loaded fresh as a server loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    template = json.loads((folder / "conch.json").read_text())["template"]
    knobs = Hyperparameters(**{**TINY_HP, **hp, "template": template})
    train = load_conversations(Path(training.storage_path), "alpaca", None)
    evaluation = load_conversations(Path(validation.storage_path), "alpaca", None)
    data = prepare_data(tokenizer, train, evaluation, knobs, 7)
    loss_fn = LossFunction(model, resolve_compute("fp32"))
    model.eval()
    batches = [pad_batch([e], int(tokenizer.pad_token_id)) for e in data.eval]
    with torch.no_grad():
        total = sum(float(loss_fn(b)) for b in batches)
    return total / sum(b.target_count for b in batches)


def test_result_files_and_continuing_from_a_fine_tune_and_a_checkpoint(db: Session) -> None:
    settings = get_settings()
    training = make_file(db, alpaca_records(8))
    validation = make_file(db, alpaca_records(4))
    parent = make_job(db, training, validation_file=validation, hyperparameters=HP)
    db.commit()
    assert run_job(parent.public_id, settings) == "succeeded"
    parent_model = f"ft:tiny-llama:t:{parent.public_id}"
    assert fresh(db, parent).fine_tuned_model == parent_model

    # Result files: OpenAI's CSV columns, one row per logged step, and a picture of the loss by step.
    files = result_files(db, parent)
    assert set(files) == {"step_metrics.csv", "loss_curve.png"}
    for file in files.values():
        assert file.purpose == "fine-tune-results" and file.tenant_id == parent.tenant_id
        assert Path(file.storage_path).stat().st_size == file.bytes
    table = list(csv.reader(io.StringIO(Path(files["step_metrics.csv"].storage_path).read_text())))
    assert COLUMNS == ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
    assert tuple(table[0]) == COLUMNS
    logged = metrics_events(db, parent)
    assert [int(r[0]) for r in table[1:]] == [m["step"] for m in logged] == list(range(1, 9))
    for row, event in zip(table[1:], logged, strict=True):
        assert float(row[1]) == pytest.approx(event["loss"], rel=1e-5)
        assert 0.0 <= float(row[2]) <= 1.0 and float(row[2]) == pytest.approx(event["token_accuracy"], rel=1e-5)
    evaluated = {int(r[0]): (float(r[3]), float(r[4])) for r in table[1:] if r[3]}
    assert set(evaluated) == {4, 8}  # one validation per epoch
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in evaluated.values())
    assert evaluated[8][0] == pytest.approx((fresh(db, parent).metrics or {})["eval_loss"], rel=1e-4)
    from PIL import Image

    with Image.open(files["loss_curve.png"].storage_path) as picture:
        picture.load()
        assert picture.format == "PNG"
        assert picture.size == (int(CURVE_SIZE_INCHES[0] * CURVE_DPI), int(CURVE_SIZE_INCHES[1] * CURVE_DPI))

    # Continue from the fine-tuned model on the same data: it starts from trained weights, not the base.
    child = make_job(
        db, training, validation_file=validation, model=parent_model, base_model="tiny-llama", hyperparameters=HP
    )
    db.commit()
    assert run_job(child.public_id, settings) == "succeeded", fresh(db, child).error
    child_model = f"ft:tiny-llama:t:{child.public_id}"  # named after the root base, as OpenAI names it
    assert fresh(db, child).fine_tuned_model == child_model
    # LoRA starts as a no-op, so step 1's loss is the start weights' loss on the same first batch: the child's is
    # nearer the parent's last loss than the parent's first.
    parent_first, parent_last = first_step_loss(db, parent), metrics_events(db, parent)[-1]["loss"]
    assert parent_last < parent_first
    assert first_step_loss(db, child) < (parent_first + parent_last) / 2
    record = db.get(ModelRecord, child_model)
    assert record is not None and record.parent_model == parent_model and record.base_model == "tiny-llama"
    child_folder = fine_tuned_dir(child.id, settings)
    assert json.loads((child_folder / "conch.json").read_text())["parent_model"] == parent_model
    lineage = get_model(db, "default", child_model, settings).conch
    assert lineage["parent_model"] == parent_model and lineage["lineage"] == ["tiny-llama", parent_model]
    # The model as published answers as it was trained: its validation loss is the one training measured.
    child_eval = (fresh(db, child).metrics or {})["eval_loss"]
    assert published_eval_loss(child_folder, training, validation, HP) == pytest.approx(child_eval, rel=1e-3)
    assert len(result_files(db, child)) == 2

    # Continue from the parent's checkpoint at step 4 (end of its first epoch): merged once, then reused.
    checkpoint = f"{parent_model}:ckpt-step-4"
    grandchild = make_job(db, training, model=checkpoint, base_model="tiny-llama", suffix="c", hyperparameters=HP)
    db.commit()
    assert run_job(grandchild.public_id, settings) == "succeeded", fresh(db, grandchild).error
    merged = job_dir(parent.id, settings) / "merged" / "step-0000004"
    assert (merged / "config.json").is_file() and (merged / "conch.json").is_file()
    # It starts from the parent's weights half-way: trained (not the base), and not the finished parent either.
    start = first_step_loss(db, grandchild)
    assert start < parent_first and start != first_step_loss(db, child)
    record = db.get(ModelRecord, f"ft:tiny-llama:c:{grandchild.public_id}")
    assert record is not None and record.parent_model == checkpoint
    lineage = get_model(db, "default", record.id, settings).conch
    assert lineage["lineage"] == ["tiny-llama", parent_model, checkpoint]


def test_a_failed_job_gets_no_result_files_and_a_vanished_parent_fails_clearly(db: Session) -> None:
    settings = get_settings()
    failing = make_job(db, make_file(db, alpaca_records(4)), hyperparameters={"compute_type": "fp16"})
    orphan = make_job(db, model="ft:tiny-llama:t:ftjob-0", base_model="tiny-llama")
    db.commit()
    assert run_job(failing.public_id, settings) == "failed"
    assert not fresh(db, failing).result_files
    assert db.scalars(select(FileObject).where(FileObject.purpose == "fine-tune-results")).first() is None

    assert run_job(orphan.public_id, settings) == "failed"
    row = fresh(db, orphan)
    assert row.status == JobStatus.FAILED and row.error is not None
    assert (row.error["code"], row.error["param"]) == ("model_not_available", "model")
