"""Jobs routed by device class and checked at creation against what the class's workers reported (rows written
by core.device_classes.publish, as a worker's probe writes them; tests/worker/test_device_routing.py has a real
worker process report its own)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from core.db import session_scope
from core.device_classes import DeviceCapabilities, publish
from tests.api.helpers import make_client
from tests.polling import wait_until

T4 = DeviceCapabilities(
    device="cuda", device_name="Tesla T4", compute_capability=(7, 5), total_memory_bytes=1024**3, bitsandbytes=True
)
CPU = DeviceCapabilities(device="cpu", device_name="cpu", total_memory_bytes=64 * 1024**3)


def report(name: str, capabilities: DeviceCapabilities) -> None:
    with session_scope() as session:
        publish(session, name, capabilities, f"celery@{name}")


def create(client: TestClient, training_file: str, **body: Any) -> Any:
    # SmolLM2-135M: its dimensions are known before its weights are converted.
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "SmolLM2-135M-Instruct", "training_file": training_file, **body}
    )


def error(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    return dict(response.json()["error"])


@pytest.fixture
def class_queues(redis_client: redis.Redis, queue_name: str) -> Iterator[dict[str, str]]:
    names = {c: f"{queue_name}.{c}" for c in ("gpu-t4", "cpu", "gpu-later")}
    redis_client.delete(*names.values())
    yield names
    redis_client.delete(*names.values())


def queued_ids(redis_client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["kwargsrepr"] for m in redis_client.lrange(queue, 0, -1)]


def test_a_job_for_a_class_goes_to_its_queue(
    client: TestClient, training_file: str, redis_client: redis.Redis, queue_name: str, class_queues: dict[str, str]
) -> None:
    report("gpu-t4", T4)
    hp = {"per_device_train_batch_size": 1, "cutoff_len": 256}
    response = create(client, training_file, device_class="gpu-t4", hyperparameters=hp)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["device_class"] == "gpu-t4"
    assert [job["id"] in m for m in queued_ids(redis_client, class_queues["gpu-t4"])] == [True]
    assert redis_client.llen(queue_name) == 0
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [e["level"] for e in events] == ["info"]  # a class that has reported: nothing to warn about


def test_a_class_no_worker_reported_is_accepted_with_a_warning(
    client: TestClient, training_file: str, redis_client: redis.Redis, class_queues: dict[str, str]
) -> None:
    response = create(client, training_file, device_class="gpu-later", hyperparameters={"quantization": "4bit"})
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    assert redis_client.llen(class_queues["gpu-later"]) == 1
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    warning = events[0]
    assert warning["level"] == "warn" and "No worker of device class gpu-later" in warning["message"]
    assert warning["data"]["queue"] == class_queues["gpu-later"]


def test_invalid_device_class_is_refused(client: TestClient, training_file: str) -> None:
    response = create(client, training_file, device_class="GPU A100!")
    assert response.status_code in (400, 422) and response.json()["error"]["param"] == "device_class"


def test_4bit_is_refused_for_a_cpu_class_naming_the_field_as_sent(client: TestClient, training_file: str) -> None:
    report("cpu", CPU)
    failure = error(create(client, training_file, device_class="cpu", hyperparameters={"quantization": "4bit"}))
    assert failure["param"] == "hyperparameters.quantization" and failure["code"] == "unsupported_quantization"
    assert "device class cpu (CPU only)" in failure["message"]
    lf = {"quantization_bit": 4}
    failure = error(create(client, training_file, device_class="cpu", method=_supervised(lf)))
    assert failure["param"] == "method.supervised.hyperparameters.quantization_bit"
    # With no class named, any worker may take the job: a reported CPU class is enough to refuse it.
    failure = error(create(client, training_file, hyperparameters={"quantization": "4bit"}))
    assert "names no device_class" in failure["message"]
    # The same job for a GPU class with bitsandbytes is accepted (and small enough for its memory).
    report("gpu-t4", T4)
    small = {"quantization": "4bit", "per_device_train_batch_size": 1, "cutoff_len": 128}
    assert create(client, training_file, device_class="gpu-t4", hyperparameters=small).status_code == 200


def test_quantization_bit_takes_only_4_and_not_both_spellings(client: TestClient, training_file: str) -> None:
    failure = error(create(client, training_file, hyperparameters={"quantization_bit": 8}))
    assert failure["param"] == "hyperparameters.quantization_bit" and failure["code"] == "unsupported_quantization"
    both = {"quantization_bit": 4, "quantization": "4bit"}
    assert error(create(client, training_file, hyperparameters=both))["code"] == "conflicting_parameters"


def test_bf16_is_refused_on_a_gpu_without_native_bf16(client: TestClient, training_file: str) -> None:
    report("gpu-t4", T4)
    hp = {"compute_type": "bf16", "per_device_train_batch_size": 1, "cutoff_len": 128}
    failure = error(create(client, training_file, device_class="gpu-t4", hyperparameters=hp))
    assert failure["param"] == "hyperparameters.compute_type" and "compute capability 8.0" in failure["message"]


def test_a_job_that_cannot_fit_the_class_s_memory_is_refused_with_the_figures(
    client: TestClient, training_file: str, redis_client: redis.Redis, class_queues: dict[str, str]
) -> None:
    report("gpu-t4", T4)  # 1 GiB
    hp = {"per_device_train_batch_size": 4, "cutoff_len": 1024}
    failure = error(create(client, training_file, device_class="gpu-t4", hyperparameters=hp))
    assert failure["param"] == "hyperparameters.per_device_train_batch_size"
    assert failure["code"] == "insufficient_device_memory"
    message = failure["message"]
    for part in ("weights", "lora", "gradients", "optimizer", "activations", "1.00 GiB", "fp16"):
        assert part in message, part
    assert redis_client.llen(class_queues["gpu-t4"]) == 0  # nothing queued, nothing stored
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    # Gradient checkpointing and a smaller batch bring it under the device's memory.
    fits = {"per_device_train_batch_size": 1, "cutoff_len": 512, "gradient_checkpointing": True}
    response = create(client, training_file, device_class="gpu-t4", hyperparameters=fits)
    assert response.status_code == 200, response.text
    assert response.json()["conch_hyperparameters"]["gradient_checkpointing"] is True


def test_default_device_class_routes_jobs_that_name_none(
    client: TestClient, training_file: str, redis_client: redis.Redis, class_queues: dict[str, str]
) -> None:
    with make_client(DEFAULT_DEVICE_CLASS="gpu-later") as routed:
        response = create(routed, training_file)
    assert response.status_code == 200, response.text
    assert response.json()["device_class"] == "gpu-later"
    assert redis_client.llen(class_queues["gpu-later"]) == 1


def _supervised(hp: dict[str, Any]) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def test_a_class_whose_workers_are_gone_stops_constraining_jobs_and_a_live_one_is_renewed(
    client: TestClient, training_file: str
) -> None:
    import threading
    from datetime import timedelta

    from sqlalchemy import update

    from core.orm import DeviceClass
    from core.settings import get_settings
    from worker import reconciler

    report("cpu", CPU)
    four_bit = {"hyperparameters": {"quantization": "4bit"}}
    assert create(client, training_file, **four_bit).status_code == 422  # a CPU worker may take it

    def age_report(seconds: float) -> None:
        with session_scope() as session:
            session.execute(update(DeviceClass).values(seen_at=DeviceClass.seen_at - timedelta(seconds=seconds)))

    # No worker of the class has been heard from for longer than DEVICE_CLASS_TTL_SECONDS: its report no longer
    # refuses jobs that name no class.
    age_report(get_settings().device_class_ttl_seconds + 60)
    assert create(client, training_file, **four_bit).status_code == 200
    # A living worker's reconciler renews its class every sweep: the report constrains jobs again.
    with session_scope() as session:
        aged = session.get(DeviceClass, "cpu").seen_at  # type: ignore[union-attr]
    stop = threading.Event()
    settings = get_settings().model_copy(update={"janitor_interval_seconds": 0.0})
    sweeping = threading.Thread(target=reconciler.run, args=(settings, stop), kwargs={"device_class": "cpu"})
    sweeping.start()
    try:

        def renewed() -> bool:
            with session_scope() as session:
                return bool(session.get(DeviceClass, "cpu", populate_existing=True).seen_at > aged)  # type: ignore[union-attr]

        wait_until(renewed, what="the reconciler to renew the cpu class")
    finally:
        stop.set()
        sweeping.join(30)
    assert create(client, training_file, **four_bit).status_code == 422
