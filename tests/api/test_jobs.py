"""/v1/fine_tuning/jobs: create (hyperparameters both ways, every bad field refused by name), enqueue after commit
on the real Redis queue, list/retrieve/cancel, events (paged and SSE), checkpoints, idempotency, broker outage."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.contracts import JobStatus
from core.db import session_scope
from core.jobs import add_event, finish
from core.orm import FineTuningJob, IdempotencyRecord
from tests.api.helpers import (
    assert_envelope,
    count_rows,
    job_uuid,
    make_client,
    queued_messages,
)
from tests.factories import alpaca_records, jsonl, make_checkpoint, minutes_ago
from tests.processes import free_port


def create(client: TestClient, training_file: str, **body: Any) -> Any:
    return client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file, **body})


# ------------------------------------------------------------------------------------------------ create


def test_create_commits_queued_job_and_enqueues_it(
    client: TestClient, training_file: str, redis_client: redis.Redis, queue_name: str
) -> None:
    response = create(client, training_file, suffix="persona-v1", seed=7, metadata={"team": "cafe"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["model"] == "tiny-llama"
    assert job["training_file"] == training_file and job["validation_file"] is None
    assert job["seed"] == 7 and job["metadata"] == {"team": "cafe"} and job["user_provided_suffix"] == "persona-v1"
    assert job["fine_tuned_model"] is None and job["finished_at"] is None and job["error"] is None
    assert job["result_files"] == [] and job["integrations"] == [] and job["auto_deploy"] is True
    assert job["method"]["type"] == "supervised"
    assert job["method"]["supervised"]["hyperparameters"] == job["hyperparameters"]
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}

    # The doorbell rang after commit: one message on the real queue naming the job, by task name.
    assert queued_messages(redis_client, queue_name) == [{"task": "conch.fine_tune", "kwargs": {"job_id": job["id"]}}]
    with session_scope() as session:
        row = session.get(FineTuningJob, job_uuid(job["id"]))
        assert row is not None and row.status == "queued" and row.enqueued_at is not None
        assert row.hyperparameters["num_train_epochs"] == 3.0


def test_seed_is_random_when_not_given(client: TestClient, training_file: str) -> None:
    seeds = {create(client, training_file).json()["seed"] for _ in range(3)}
    assert len(seeds) > 1 and all(isinstance(s, int) for s in seeds)


def test_openai_hyperparameters_map_to_conch_knobs(client: TestClient, training_file: str) -> None:
    job = create(
        client, training_file, hyperparameters={"n_epochs": 5, "batch_size": 8, "learning_rate_multiplier": 2}
    ).json()
    hp = job["conch_hyperparameters"]
    assert hp["num_train_epochs"] == 5.0 and hp["per_device_train_batch_size"] == 8
    assert hp["learning_rate"] == pytest.approx(2e-3)
    assert job["hyperparameters"] == {"n_epochs": 5, "batch_size": 8, "learning_rate_multiplier": 2.0}


def test_auto_values_take_defaults(client: TestClient, training_file: str) -> None:
    job = create(
        client,
        training_file,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
            },
        },
    ).json()
    assert job["conch_hyperparameters"]["num_train_epochs"] == 3.0
    assert job["conch_hyperparameters"]["learning_rate"] == pytest.approx(1e-3)


def test_method_carries_llama_factory_knobs(client: TestClient, training_file: str) -> None:
    knobs = {
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "lora_target": ["q_proj", "v_proj"],
        "cutoff_len": 256,
        "learning_rate": 5e-4,
        "num_train_epochs": 1.5,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "max_grad_norm": 0.5,
        "max_samples": 100,
        "val_size": 0.1,
        "lr_scheduler_type": "linear",
        "warmup_ratio": 0.1,
        "compute_type": "fp32",
        "save_steps": 10,
        "train_on_prompt": True,
        "template": "chatml",
    }
    response = create(client, training_file, method={"type": "supervised", "supervised": {"hyperparameters": knobs}})
    assert response.status_code == 200, response.text
    job = response.json()
    assert {k: job["conch_hyperparameters"][k] for k in knobs} == knobs
    # OpenAI's view: effective batch = per-device x accumulation, multiplier relative to the default rate.
    assert job["hyperparameters"] == {"n_epochs": 1.5, "batch_size": 8, "learning_rate_multiplier": 0.5}


def test_request_model_covers_every_hyperparameter() -> None:
    from api.schemas import DpoHyperparametersIn, HyperparametersIn
    from core.contracts import Hyperparameters

    # The method is method.type; DPO's beta is a knob of method.dpo only.
    knobs = set(Hyperparameters.model_fields) - {"method"}
    assert knobs - {"beta"} <= set(HyperparametersIn.model_fields)
    assert knobs <= set(DpoHyperparametersIn.model_fields)


BAD_BODIES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("missing_model", {"model": None}, 422, "model"),
    ("unknown_model", {"model": "gpt-9"}, 400, "model"),
    ("missing_training_file", {"training_file": None}, 422, "training_file"),
    ("unknown_training_file", {"training_file": "file-" + "0" * 32}, 400, "training_file"),
    ("garbage_training_file", {"training_file": "../../etc/passwd"}, 400, "training_file"),
    ("unknown_validation_file", {"validation_file": "file-" + "1" * 32}, 400, "validation_file"),
    ("model_wrong_type", {"model": 42}, 422, "model"),
    ("seed_as_string", {"seed": "42"}, 422, "seed"),
    ("seed_negative", {"seed": -1}, 422, "seed"),
    ("auto_deploy_string", {"auto_deploy": "yes"}, 422, "auto_deploy"),
    ("suffix_bad_chars", {"suffix": "my model!"}, 422, "suffix"),
    ("suffix_too_long", {"suffix": "x" * 65}, 422, "suffix"),
    ("metadata_17_pairs", {"metadata": {f"k{i}": "v" for i in range(17)}}, 422, "metadata"),
    ("metadata_non_string", {"metadata": {"k": 1}}, 422, "metadata.k"),
    ("metadata_long_value", {"metadata": {"k": "v" * 513}}, 422, "metadata"),
    ("client_sets_status", {"status": "succeeded"}, 422, "status"),
    ("client_sets_id", {"id": "ftjob-123"}, 422, "id"),
    ("client_sets_tenant", {"tenant_id": "other"}, 422, "tenant_id"),
    ("client_sets_fine_tuned_model", {"fine_tuned_model": "ft:x"}, 422, "fine_tuned_model"),
    ("client_sets_attempts", {"attempts": 0}, 422, "attempts"),
    ("n_epochs_zero", {"hyperparameters": {"n_epochs": 0}}, 422, "hyperparameters.n_epochs"),
    ("n_epochs_float", {"hyperparameters": {"n_epochs": 2.5}}, 422, "hyperparameters.n_epochs"),
    ("n_epochs_word", {"hyperparameters": {"n_epochs": "many"}}, 422, "hyperparameters.n_epochs"),
    (
        "multiplier_negative",
        {"hyperparameters": {"learning_rate_multiplier": -1}},
        422,
        "hyperparameters.learning_rate_multiplier",
    ),
    ("batch_too_big", {"hyperparameters": {"batch_size": 100_000}}, 422, "hyperparameters.batch_size"),
    ("unknown_openai_knob", {"hyperparameters": {"n_epoch": 3}}, 422, "hyperparameters.n_epoch"),
    (
        "unknown_method_knob",
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_rnk": 8}}}},
        422,
        "method.supervised.hyperparameters.lora_rnk",
    ),
    (
        "lora_dropout_out_of_range",
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_dropout": 1.5}}}},
        422,
        "method.supervised.hyperparameters.lora_dropout",
    ),
    (
        "bad_scheduler",
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"lr_scheduler_type": "sometimes"}}}},
        422,
        "method.supervised.hyperparameters.lr_scheduler_type",
    ),
    (
        "same_knob_twice",
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "num_train_epochs": 3}}}},
        422,
        "method.supervised.hyperparameters.n_epochs",
    ),
    (
        "empty_lora_target",
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_target": []}}}},
        422,
        "method.supervised.hyperparameters",
    ),
    # The training file holds conversations: DPO needs preference pairs.
    ("dpo_on_a_supervised_file", {"method": {"type": "dpo", "dpo": {}}}, 400, "training_file"),
    ("dpo_with_supervised_section", {"method": {"type": "dpo", "supervised": {}}}, 400, "method.supervised"),
    ("supervised_with_dpo_section", {"method": {"type": "supervised", "dpo": {}}}, 400, "method.dpo"),
    (
        "dpo_beta_out_of_range",
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
        422,
        "method.dpo.hyperparameters.beta",
    ),
    (
        "dpo_unknown_knob",
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"betta": 0.1}}}},
        422,
        "method.dpo.hyperparameters.betta",
    ),
    ("unknown_method", {"method": {"type": "reinforcement"}}, 422, "method.type"),
    (
        # 16 x 1024 tokens is within the default limit for SFT, but a DPO step runs both replies of each pair.
        "dpo_pairs_count_twice_per_step",
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"per_device_train_batch_size": 16}}}},
        422,
        "method.dpo.hyperparameters.per_device_train_batch_size",
    ),
    (
        "hyperparameters_twice",
        {"hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised", "supervised": {"hyperparameters": {}}}},
        400,
        "hyperparameters",
    ),
    ("integrations_unsupported", {"integrations": [{"type": "wandb"}]}, 422, "integrations"),
]


@pytest.mark.parametrize(("case", "changes", "status", "param"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_job_bodies_are_refused_by_field(
    client: TestClient,
    training_file: str,
    redis_client: redis.Redis,
    queue_name: str,
    case: str,
    changes: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    body: dict[str, Any] = {"model": "tiny-llama", "training_file": training_file}
    for key, value in changes.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    assert_envelope(client.post("/v1/fine_tuning/jobs", json=body), status, param=param)
    assert count_rows(FineTuningJob) == 0
    assert redis_client.llen(queue_name) == 0


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"model": "tiny-llama", "training_file": ', {"Content-Type": "application/json"}),
        (b"\xff\xfe not json", {"Content-Type": "application/json"}),
        (b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}),
        (b'["model", "training_file"]', {"Content-Type": "application/json"}),
        (b'"just a string"', {"Content-Type": "application/json"}),
        (b"model=tiny-llama", {"Content-Type": "application/x-www-form-urlencoded"}),
        (b"", {"Content-Type": "application/json"}),
    ],
    ids=["truncated", "not_utf8", "nested_100k", "array", "string", "form", "empty"],
)
def test_malformed_bodies_get_4xx_envelope(client: TestClient, content: bytes, headers: dict[str, str]) -> None:
    response = client.post("/v1/fine_tuning/jobs", content=content, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert_envelope(response, response.status_code)
    assert count_rows(FineTuningJob) == 0


# ------------------------------------------------------------------------------------------------ idempotency


def test_idempotency_key_returns_the_first_job(
    client: TestClient, training_file: str, redis_client: redis.Redis, queue_name: str
) -> None:
    body = {"model": "tiny-llama", "training_file": training_file, "suffix": "once"}
    first = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "retry-1"})
    # Same body, different key order and whitespace: still the same request.
    again = client.post(
        "/v1/fine_tuning/jobs",
        content=json.dumps(dict(reversed(body.items())), indent=2),
        headers={"Idempotency-Key": "retry-1", "Content-Type": "application/json"},
    )
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert count_rows(FineTuningJob) == 1 and count_rows(IdempotencyRecord) == 1
    assert len(queued_messages(redis_client, queue_name)) == 1

    changed = client.post(
        "/v1/fine_tuning/jobs", json={**body, "suffix": "twice"}, headers={"Idempotency-Key": "retry-1"}
    )
    assert_envelope(changed, 422, code="idempotency_key_reused")
    assert count_rows(FineTuningJob) == 1

    other = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "retry-2"})
    assert other.status_code == 200 and other.json()["id"] != first.json()["id"]
    assert count_rows(FineTuningJob) == 2


def test_failed_request_does_not_burn_the_key(client: TestClient, training_file: str) -> None:
    bad = client.post(
        "/v1/fine_tuning/jobs", json={"model": "nope", "training_file": training_file}, headers={"Idempotency-Key": "k"}
    )
    assert_envelope(bad, 400, param="model")
    assert count_rows(IdempotencyRecord) == 0
    good = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-llama", "training_file": training_file},
        headers={"Idempotency-Key": "k"},
    )
    assert good.status_code == 200


def test_idempotent_upload(client: TestClient) -> None:
    from core.orm import FileObject

    content = jsonl(alpaca_records(4))

    def post(data: bytes) -> Any:
        return client.post(
            "/v1/files",
            files={"file": ("a.jsonl", data)},
            data={"purpose": "fine-tune"},
            headers={"Idempotency-Key": "upload-1"},
        )

    first, again = post(content), post(content)
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert count_rows(FileObject) == 1
    assert_envelope(post(jsonl(alpaca_records(5))), 422, code="idempotency_key_reused")
    assert count_rows(FileObject) == 1


# ------------------------------------------------------------------------------------------------ broker outage


def test_broker_down_at_create_still_queues_and_reconciler_enqueues_later(
    clean_db: None, redis_client: redis.Redis, queue_name: str
) -> None:

    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    with make_client(REDIS_URL=dead_broker) as down:
        file_id = down.post(
            "/v1/files", files={"file": ("a.jsonl", jsonl(alpaca_records(4)))}, data={"purpose": "fine-tune"}
        ).json()["id"]
        response = down.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "queued"
        ready = down.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["broker"] != "ok"
    assert redis_client.llen(queue_name) == 0
    with session_scope() as session:
        row = session.get(FineTuningJob, job_uuid(job["id"]))
        assert row is not None and row.status == "queued"
        # Pretend the lost enqueue happened a while ago rather than sleeping past REQUEUE_AFTER_SECONDS.
        row.enqueued_at = minutes_ago(5)

    # The broker is back: the api's reconciler thread finds the stale queued job and rings again.
    with make_client(reconciler=True):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and redis_client.llen(queue_name) == 0:
            time.sleep(0.2)
    assert queued_messages(redis_client, queue_name)[:1] == [
        {"task": "conch.fine_tune", "kwargs": {"job_id": job["id"]}}
    ]


# ------------------------------------------------------------------------------------------------ read


def test_list_paginates_and_filters(client: TestClient, training_file: str) -> None:
    ids = [
        create(client, training_file, metadata={"team": "a" if i % 2 else "b", "n": str(i)}).json()["id"]
        for i in range(4)
    ]
    client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel")

    page = client.get("/v1/fine_tuning/jobs", params={"limit": 3}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [j["id"] for j in page["data"]] == ids[:0:-1]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 3, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False

    cancelled = client.get("/v1/fine_tuning/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    team_a = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a"}).json()["data"]
    assert sorted(j["id"] for j in team_a) == sorted([ids[1], ids[3]])
    both = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a", "metadata[n]": "3"}).json()["data"]
    assert [j["id"] for j in both] == [ids[3]]
    assert_envelope(client.get("/v1/fine_tuning/jobs", params={"status": "sleeping"}), 422, param="status")
    assert_envelope(client.get("/v1/fine_tuning/jobs", params={"limit": 10_001}), 422, param="limit")
    assert_envelope(client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"}), 400, param="after")


def test_retrieve_shows_progress_metrics_and_failure(client: TestClient, training_file: str) -> None:
    job_id = create(client, training_file).json()["id"]
    error = {"code": "max_attempts_exceeded", "message": "gave up", "param": None}
    with session_scope() as session:
        session.execute(
            update(FineTuningJob)
            .where(FineTuningJob.id == job_uuid(job_id))
            .values(
                status="failed",
                stage="training",
                progress={"step": 3, "total_steps": 12, "epoch": 0.75, "eta_seconds": 30.0},
                metrics={"loss": 1.5},
                trained_tokens=1234,
                error=error,
                finished_at=minutes_ago(0),
                attempts=3,
            )
        )
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["stage"] == "training"
    assert job["progress"]["step"] == 3 and job["progress"]["total_steps"] == 12
    assert job["metrics"] == {"loss": 1.5} and job["trained_tokens"] == 1234
    assert job["error"] == error and job["attempts"] == 3
    assert isinstance(job["finished_at"], int)
    assert_envelope(client.get("/v1/fine_tuning/jobs/ftjob-" + "0" * 32), 404)
    assert_envelope(client.get("/v1/fine_tuning/jobs/ftjob-zzz"), 404)


def test_cancel(client: TestClient, training_file: str) -> None:
    job_id = create(client, training_file).json()["id"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    # Cancelling again answers the same job; nothing changes.
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert [e["message"] for e in events].count("Job cancelled before it started") == 1

    running = create(client, training_file).json()["id"]
    with session_scope() as session:
        session.execute(
            update(FineTuningJob)
            .where(FineTuningJob.id == job_uuid(running))
            .values(status="running", lease_owner="w1")
        )
    assert client.post(f"/v1/fine_tuning/jobs/{running}/cancel").json()["status"] == "cancelling"

    done = create(client, training_file).json()["id"]
    with session_scope() as session:
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job_uuid(done)).values(status="succeeded"))
    assert_envelope(client.post(f"/v1/fine_tuning/jobs/{done}/cancel"), 409, code="job_finished")
    assert_envelope(client.post("/v1/fine_tuning/jobs/ftjob-" + "0" * 32 + "/cancel"), 404)


# ------------------------------------------------------------------------------------------------ events


def _add_events(job_id: str, count: int) -> None:
    with session_scope() as session:
        for i in range(count):
            add_event(
                session,
                job_uuid(job_id),
                f"Step {i + 1}",
                type_="metrics",
                level="warning" if i == 0 else "info",
                data={"step": i + 1, "total_steps": count, "loss": 2.0 - i * 0.1},
            )


def test_events_newest_first_paginated(client: TestClient, training_file: str) -> None:
    job_id = create(client, training_file).json()["id"]
    _add_events(job_id, 4)
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 3}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [e["message"] for e in page["data"]] == ["Step 4", "Step 3", "Step 2"]
    event = page["data"][0]
    assert event["object"] == "fine_tuning.job.event" and event["id"].startswith("ftevent-")
    assert event["type"] == "metrics" and event["data"]["step"] == 4 and event["level"] == "info"
    rest = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 3, "after": page["data"][-1]["id"]})
    messages = [e["message"] for e in rest.json()["data"]]
    assert messages == ["Step 1", f"Created fine-tuning job: {job_id}"] and rest.json()["has_more"] is False
    assert rest.json()["data"][0]["level"] == "warn"
    assert rest.json()["data"][1]["type"] == "message"
    assert_envelope(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": "bogus"}), 400)


def _read_sse(response: Any) -> list[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream response."""
    out, event, data = [], "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            out.append((event, "\n".join(data)))
            event, data = "message", []
    return out


def test_event_stream_replays_then_ends_when_job_is_terminal(client: TestClient, training_file: str) -> None:
    job_id = create(client, training_file).json()["id"]
    _add_events(job_id, 2)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = _read_sse(response)
    assert received[-1] == ("done", "[DONE]")
    messages = [json.loads(d)["message"] for e, d in received[:-1]]
    assert messages == [f"Created fine-tuning job: {job_id}", "Step 1", "Step 2", "Job cancelled before it started"]
    assert all(e == "fine_tuning.job.event" for e, _ in received[:-1])

    # Resuming after an event id sends only what came later.
    second = json.loads(received[1][1])["id"]
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers={"Last-Event-ID": second}) as r:
        later = [json.loads(d)["message"] for e, d in _read_sse(r) if e != "done"]
    assert later == ["Step 2", "Job cancelled before it started"]


def test_event_stream_follows_a_live_job(client: TestClient, training_file: str) -> None:
    job_id = create(client, training_file).json()["id"]

    def worker_like() -> None:
        time.sleep(0.3)
        _add_events(job_id, 3)
        time.sleep(0.3)
        with session_scope() as session:
            session.execute(update(FineTuningJob).where(FineTuningJob.id == job_uuid(job_id)).values(status="running"))
        with session_scope() as session:
            assert finish(session, job_uuid(job_id), JobStatus.SUCCEEDED, message="The job has successfully completed")

    thread = threading.Thread(target=worker_like)
    thread.start()
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", params={"poll_seconds": 0.1}) as r:
        received = _read_sse(r)
    thread.join()
    messages = [json.loads(d)["message"] for e, d in received if e != "done"]
    assert messages == [
        f"Created fine-tuning job: {job_id}",
        "Step 1",
        "Step 2",
        "Step 3",
        "The job has successfully completed",
    ]
    assert received[-1] == ("done", "[DONE]")


def test_event_stream_unknown_job_is_404(client: TestClient) -> None:
    assert_envelope(client.get("/v1/fine_tuning/jobs/ftjob-" + "0" * 32 + "/events/stream"), 404)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_newest_first(client: TestClient, training_file: str) -> None:
    job_id = create(client, training_file, suffix="ck").json()["id"]
    with session_scope() as session:
        for step in (10, 20, 30):
            make_checkpoint(session, job_uuid(job_id), step, metrics={"train_loss": 1 / step})
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 2}).json()
    assert page["has_more"] is True and [c["step_number"] for c in page["data"]] == [30, 20]
    ckpt = page["data"][0]
    assert ckpt["object"] == "fine_tuning.job.checkpoint" and ckpt["id"].startswith("ftckpt-")
    assert ckpt["fine_tuning_job_id"] == job_id
    assert ckpt["fine_tuned_model_checkpoint"] == f"ft:tiny-llama:ck:{job_id}:ckpt-step-30"
    assert ckpt["metrics"]["step"] == 30 and ckpt["metrics"]["train_loss"] == pytest.approx(1 / 30)
    rest = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"after": page["data"][-1]["id"]}).json()
    assert [c["step_number"] for c in rest["data"]] == [10] and rest["has_more"] is False


def test_rows_written_under_an_older_schema_still_read(client: TestClient, training_file: str) -> None:
    job_id = create(client, training_file).json()["id"]
    with session_scope() as session:
        session.execute(
            update(FineTuningJob)
            .where(FineTuningJob.id == job_uuid(job_id))
            .values(hyperparameters={"num_train_epochs": 2, "retired_knob": True})
        )
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["hyperparameters"]["n_epochs"] == 2
    assert "retired_knob" not in job["conch_hyperparameters"]


def test_concurrent_retries_with_one_key_create_one_job(client: TestClient, training_file: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "tiny-llama", "training_file": training_file}

    def post(_: int) -> Any:
        return client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "race"})

    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(post, range(4)))
    ok = [r for r in responses if r.status_code == 200]
    # A retry that overlaps the first request is told to retry (409); every answered one names the same job.
    assert ok and all(r.status_code in (200, 409) for r in responses)
    for response in responses:
        if response.status_code == 409:
            assert_envelope(response, 409, code="idempotency_key_in_use")
    assert len({r.json()["id"] for r in ok}) == 1
    assert count_rows(FineTuningJob) == 1 and count_rows(IdempotencyRecord) == 1
