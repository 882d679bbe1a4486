"""Device classes with real worker processes: each reports its device at start-up, takes the jobs routed to its
class and not another class's, and the api refuses a job the class cannot run."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.contracts import JobStatus
from core.ids import Prefix, public_id
from core.orm import DeviceClass
from core.queue import enqueue_fine_tune
from core.reconcile import reconcile_once
from core.settings import get_settings
from tests import polling
from tests.api.helpers import make_client
from tests.factories import fresh, make_file, make_job
from tests.processes import ServiceProcess
from tests.worker.helpers import StartWorker

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("tiny_models")]
QUEUE = os.environ["TRAINING_QUEUE"]


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    names = [QUEUE, *(f"{QUEUE}.{c}" for c in ("alpha", "beta", "gamma"))]
    client.delete(*names)
    yield client
    client.delete(*names)
    client.close()


def claimed(process: ServiceProcess, job_id: str) -> bool:
    return any("job.claimed" in line and job_id in line for line in process.log().splitlines())


def reported(db: Session, name: str) -> DeviceClass | None:
    db.expire_all()
    return db.scalars(select(DeviceClass).where(DeviceClass.name == name)).first()


def test_a_class_s_job_is_trained_by_its_worker_only_and_4bit_is_refused_on_its_cpu(
    db: Session, broker: redis.Redis, start_worker: StartWorker
) -> None:
    alpha = start_worker("alpha", env={"WORKER_DEVICE_CLASS": "alpha"})
    row = polling.wait_until(lambda: reported(db, "alpha"), "the worker to report its device", timeout=120)
    assert row.capabilities["device"] == "cpu" and row.worker.startswith("alpha@")
    assert row.capabilities["bitsandbytes"] == (importlib.util.find_spec("bitsandbytes") is not None)

    # The api checks a job against what the class's worker reported: QLoRA on this CPU is a clear 422.
    training = make_file(db)
    db.commit()
    with make_client() as client:
        body = {"model": "tiny-llama", "training_file": training.public_id, "device_class": "alpha"}
        refused = client.post("/v1/fine_tuning/jobs", json={**body, "hyperparameters": {"quantization": "4bit"}})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["param"] == "hyperparameters.quantization"
    assert "device class alpha (CPU only)" in refused.json()["error"]["message"]

    job = make_job(db, device_class="beta")
    db.commit()
    enqueue_fine_tune(job.public_id, get_settings(), "beta")
    # A doorbell for alpha's own queue, rung after beta's: once alpha has answered it, beta's is still waiting.
    marker = public_id(Prefix.JOB, uuid.uuid4())
    enqueue_fine_tune(marker, get_settings(), "alpha")
    polling.wait_until(lambda: "job.claim_refused" in alpha.log() and marker in alpha.log(), "alpha's doorbell")
    assert broker.llen(f"{QUEUE}.beta") >= 1 and fresh(db, job).status == JobStatus.QUEUED

    beta = start_worker("beta", env={"WORKER_DEVICE_CLASS": "beta"})
    polling.wait_until(
        lambda: fresh(db, job).status in (JobStatus.SUCCEEDED, JobStatus.FAILED),
        "beta to train the job",
        timeout=240,
        logs=beta.log,
    )
    assert fresh(db, job).status == JobStatus.SUCCEEDED
    assert claimed(beta, job.public_id) and not claimed(alpha, job.public_id)


def test_the_reconciler_rings_a_job_again_on_its_class_s_queue(db: Session, broker: redis.Redis) -> None:
    from datetime import timedelta

    from core.orm import utcnow

    job = make_job(db, device_class="gamma", enqueued_at=utcnow() - timedelta(minutes=5))
    db.commit()
    assert reconcile_once(get_settings())["requeued"] == 1
    messages = broker.lrange(f"{QUEUE}.gamma", 0, -1)
    assert len(messages) == 1 and job.public_id.encode() in messages[0]
    assert broker.llen(QUEUE) == 0
