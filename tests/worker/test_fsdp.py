"""FSDP through TRAINING_ACCELERATE_CONFIG: an accelerate config with ``distributed_type: FSDP`` (FSDP2) runs a job
as two CPU processes (gloo) that shard the model, launched by the real runner against the real database. Same
losses as one process at the same effective batch, a complete adapter in every checkpoint and in the published
model, resume from a checkpoint the sharded ranks wrote; configs the loop cannot run are refused before any
process starts."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.orm import Checkpoint
from core.queue import enqueue_fine_tune
from core.settings import Settings, get_settings
from core.storage import fine_tuned_dir
from tests.factories import alpaca_records, fresh, job_events, make_file, make_job
from tests.processes import worker_process
from tests.worker.test_distributed import (
    EXAMPLES,
    LOSS_TOLERANCE,
    ONE,
    STEPS,
    TWO,
    assert_one_set_of_events,
    assert_resumed_exactly,
    checkpoint_steps,
    has_checkpoint,
    losses,
    rank_processes,
    run_past_lost_ranks,
    settings_with_cpu_ranks,
    wait_until,
)
from worker.runner import run_job

pytestmark = pytest.mark.usefixtures("tiny_models")

# accelerate's FSDP2 settings: one shard unit per decoder layer (the model's _no_split_modules), parameters
# freed after each unit's forward, the whole model loaded by every rank.
FSDP = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "num_machines": 1,
    "machine_rank": 0,
    "mixed_precision": "no",
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_offload_params": False,
        "fsdp_activation_checkpointing": False,
    },
}
# FSDP's reduce-scatter sums the two halves' gradients as DDP's all-reduce does; the tolerance is DDP's
# (tests/worker/test_distributed.py): float reassociation only, where any real difference moves the loss by percents.


def fsdp_settings(tmp_path: Path, config: dict[str, Any] = FSDP) -> Settings:
    path = tmp_path / "accelerate-fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    return get_settings().model_copy(update={"training_cpu_processes": True, "training_accelerate_config": str(path)})


def adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def load_adapter(base: Path, folder: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(folder))


def test_fsdp_on_two_processes_trains_like_one_and_publishes_a_whole_adapter(
    db: Session, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    file = make_file(db, alpaca_records(EXAMPLES))
    # 5 validation examples in batches of 2: three batches, so one rank evaluates one more than the other and
    # the other makes an uncounted pass (every FSDP forward is a collective).
    validation = make_file(db, alpaca_records(5))
    one = make_job(db, file, validation_file=validation, hyperparameters={**ONE, "save_steps": 3})
    two = make_job(db, file, validation_file=validation, hyperparameters={**TWO, "save_steps": 3})
    db.commit()

    assert run_job(one.public_id, get_settings()) == "succeeded"
    assert run_job(two.public_id, fsdp_settings(tmp_path)) == "succeeded", fresh(db, two).error

    assert_one_set_of_events(db, two, list(range(1, STEPS + 1)))
    assert losses(db, two) == pytest.approx(losses(db, one), rel=LOSS_TOLERANCE)
    row_one, row_two = fresh(db, one), fresh(db, two)
    assert row_one.metrics is not None and row_two.metrics is not None
    assert row_two.metrics["train_loss"] == pytest.approx(row_one.metrics["train_loss"], rel=LOSS_TOLERANCE)
    assert row_two.metrics["eval_loss"] == pytest.approx(row_one.metrics["eval_loss"], rel=LOSS_TOLERANCE)
    # Sharded parameters still count whole.
    assert row_two.metrics["trainable_parameters"] == row_one.metrics["trainable_parameters"]
    assert row_two.trained_tokens == row_one.trained_tokens

    # Every checkpoint holds the whole adapter (gathered on rank 0) and says it was written sharded.
    folders = [Path(p) for p in db.scalars(select(Checkpoint.storage_path).where(Checkpoint.job_id == two.id))]
    reference = adapter_shapes(fine_tuned_dir(one.id, get_settings()) / "adapter")
    assert folders
    for folder in folders:
        assert json.loads((folder / "state.json").read_text())["sharded"] is True
        assert adapter_shapes(folder) == reference
    published = fine_tuned_dir(two.id, get_settings()) / "adapter"
    assert adapter_shapes(published) == reference
    model = load_adapter(tiny_models["tiny-llama"], published)
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert trained and all(float(p.abs().sum()) > 0 for p in trained.values())  # B starts at zero: trained
    assert not rank_processes(two.public_id)


@pytest.mark.e2e
def test_an_fsdp_job_through_a_celery_worker_set_up_by_its_environment(
    db: Session, tmp_path: Path, log_dir: Path
) -> None:
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(FSDP))
    env = {"TRAINING_CPU_PROCESSES": "true", "TRAINING_ACCELERATE_CONFIG": str(config)}
    worker = worker_process("fsdp-worker", log_dir, env=env).start()
    try:
        worker.wait_for_log("ready", timeout=120)
        job = make_job(db, make_file(db, alpaca_records(8)), hyperparameters={"num_devices": 2, "save_steps": 2})
        db.commit()
        enqueue_fine_tune(job.public_id, get_settings())
        finished = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
        wait_until(lambda: fresh(db, job).status in finished, "the job to finish", timeout=300)
        assert fresh(db, job).status == JobStatus.SUCCEEDED, fresh(db, job).error
        assert_one_set_of_events(db, job, [1, 2, 3, 4])
        folders = [Path(p) for p in db.scalars(select(Checkpoint.storage_path).where(Checkpoint.job_id == job.id))]
        assert folders and all(json.loads((f / "state.json").read_text())["sharded"] is True for f in folders)
        wait_until(lambda: "job.delivery_done" in worker.log(), "the delivery to end", timeout=120)
        assert not rank_processes(job.public_id)
    finally:
        worker.kill()


@pytest.mark.parametrize(
    ("first", "then"),
    [("fsdp", "fsdp"), ("ddp", "fsdp"), ("fsdp", "ddp")],
    ids=["fsdp", "ddp-then-fsdp", "fsdp-then-ddp"],
)
def test_a_checkpoint_written_by_fsdp_ranks_resumes(db: Session, tmp_path: Path, first: str, then: str) -> None:
    """Also across a change of the worker's config between two attempts (DDP <-> FSDP, same number of ranks)."""
    file = make_file(db, alpaca_records(24))
    knobs = {"per_device_train_batch_size": 1, "num_train_epochs": 3, "save_steps": 3, "compute_type": "fp32"}
    uninterrupted = make_job(db, file, hyperparameters={**knobs, "per_device_train_batch_size": 2})
    job = make_job(db, file, hyperparameters={**knobs, "num_devices": 2})
    db.commit()
    total = 3 * 12
    settings = {"fsdp": fsdp_settings(tmp_path), "ddp": settings_with_cpu_ranks()}
    job_id = job.id

    def shut_down_after_a_checkpoint() -> None:
        wait_until(lambda: has_checkpoint(job_id), "a checkpoint")
        os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler asks for a graceful stop

    watcher = threading.Thread(target=shut_down_after_a_checkpoint, daemon=True)
    watcher.start()
    assert run_job(job.public_id, settings[first]) == "released"
    watcher.join(timeout=10)
    saved = checkpoint_steps(db, job)[-1]
    assert 0 < saved < total
    folder = Path(db.scalars(select(Checkpoint.storage_path).where(Checkpoint.job_id == job.id)).all()[-1])
    if first == "fsdp":  # one whole optimizer state (not one per rank) and each rank's RNG
        names = {p.name for p in folder.iterdir()}
        assert {"optimizer.pt", "rng.pt", "rng-rank1.pt", "adapter_model.safetensors"} <= names
        assert "optimizer-rank1.pt" not in names

    outcome, retries = run_past_lost_ranks(db, job, settings[then])
    assert outcome == "succeeded", fresh(db, job).error
    resumed = [e for e in job_events(db, job) if e.message.startswith("Resuming from the checkpoint")]
    assert len(resumed) == 1 + retries
    assert_resumed_exactly(db, job, uninterrupted, total)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({**FSDP, "fsdp_config": {**FSDP["fsdp_config"], "fsdp_version": 1}}, "FSDP version 1"),
        ({"distributed_type": "DEEPSPEED", "num_machines": 1, "deepspeed_config": {"zero_stage": 2}}, "DeepSpeed"),
        ({**FSDP, "fsdp_config": {**FSDP["fsdp_config"], "fsdp_offload_params": True}}, "fsdp_offload_params"),
    ],
)
def test_a_config_the_worker_cannot_run_is_refused_before_any_process_starts(
    db: Session, tmp_path: Path, config: dict[str, Any], words: str
) -> None:
    job = make_job(db, make_file(db, alpaca_records(4)), hyperparameters={"num_devices": 2})
    db.commit()
    assert run_job(job.public_id, fsdp_settings(tmp_path, config)) == "failed"
    row = fresh(db, job)
    assert row.status == JobStatus.FAILED and row.error is not None
    assert row.error["code"] == "devices_unavailable" and row.error["param"] == "num_devices"
    assert words in row.error["message"] and "TRAINING_ACCELERATE_CONFIG" in row.error["message"]
    assert not any(e.message.startswith("Plan:") for e in job_events(db, job))  # refused before training
