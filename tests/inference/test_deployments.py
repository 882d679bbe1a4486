"""Hot-swap: deployments written to Postgres (and announced over Redis) drive which model answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.orm import utcnow
from tests.factories import fresh, make_deployment, make_model
from tests.inference.helpers import (
    ACTIVE,
    FAILED,
    SUPERSEDED,
    app_client,
    copy_model,
    deploy,
    metric,
    replica_row,
    replica_states,
    truncate_weights,
    wait_deployment,
)
from tests.polling import wait_until
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("clean_db", "tiny_models")

FT_ONE = "ft:tiny-llama:one:ftjob-0001"
FT_TWO = "ft:tiny-llama:two:ftjob-0002"


def _served(client) -> str:  # type: ignore[no-untyped-def]
    response = client.get("/generate", params={"prompt": "Hello", "max_new_tokens": 2})
    assert response.status_code == 200
    assert response.headers["x-conch-model"] == response.json()["model"]
    return str(response.json()["model"])


def test_a_published_deployment_swaps_the_answering_model(db, finetuned, finetuned_two) -> None:  # type: ignore[no-untyped-def]
    make_model(db, FT_ONE, storage_path=finetuned)
    make_model(db, FT_TWO, storage_path=finetuned_two)
    db.commit()
    with app_client() as client:
        assert _served(client) == "tiny-llama"
        first = deploy(db, FT_ONE)
        row = wait_deployment(db, first, ACTIVE, FAILED)
        assert row.status == ACTIVE, row.reason
        assert row.activated_at is not None and row.latency_seconds is not None and row.latency_seconds > 0
        assert _served(client) == FT_ONE
        second = deploy(db, FT_TWO)
        assert wait_deployment(db, second, ACTIVE, FAILED).status == ACTIVE
        assert fresh(db, first).status == SUPERSEDED
        assert _served(client) == FT_TWO
        # Rolling back is deploying the previous model again; it is still in memory, so it only re-answers a smoke.
        back = deploy(db, FT_ONE)
        assert wait_deployment(db, back, ACTIVE, FAILED).status == ACTIVE
        assert _served(client) == FT_ONE
        text = client.get("/metrics").text
        assert metric(text, "conch_inference_swaps_total", result="ok") == 3
        assert metric(text, "conch_inference_swap_latency_seconds_count") == 3
        answers = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        ).json()
        assert answers["model"] == FT_ONE


def test_a_deployment_whose_message_was_missed_is_found_by_polling(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    make_model(db, FT_ONE, storage_path=finetuned)
    db.commit()
    with app_client() as client:
        row = deploy(db, FT_ONE, publish=False)
        assert wait_deployment(db, row, ACTIVE, FAILED).status == ACTIVE
        assert _served(client) == FT_ONE


def _nan_model(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    build_tiny_model(folder, "llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("damage", ["truncated_weights", "bad_config", "missing_folder", "nan_weights", "pickle_only"])
def test_a_broken_model_is_never_swapped_in(db, tmp_path, tiny_models, damage) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "broken"
    if damage == "truncated_weights":
        truncate_weights(copy_model(tiny_models["tiny-llama"], folder))
    elif damage == "bad_config":
        copy_model(tiny_models["tiny-llama"], folder, config_changes={"hidden_size": 96, "model_type": "llama"})
    elif damage == "nan_weights":
        _nan_model(folder)
    elif damage == "pickle_only":
        copy_model(tiny_models["tiny-llama"], folder)
        for weights in folder.glob("*.safetensors"):
            weights.rename(weights.with_suffix(".bin"))
    make_model(db, "ft:tiny-llama:broken:ftjob-bad", storage_path=folder)
    db.commit()
    with app_client() as client:
        row = deploy(db, "ft:tiny-llama:broken:ftjob-bad")
        failed = wait_deployment(db, row, ACTIVE, FAILED)
        assert failed.status == FAILED
        assert failed.reason
        assert failed.activated_at is None
        assert _served(client) == "tiny-llama"  # the old model keeps serving
        assert client.get("/readyz").status_code == 200
        assert metric(client.get("/metrics").text, "conch_inference_swaps_total", result="failed") == 1


def test_a_deployment_of_an_unknown_or_foreign_model_fails(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    make_model(db, FT_ONE, storage_path=finetuned, tenant_id="someone-else")
    db.commit()
    with app_client() as client:
        # One after the other: a newer request of the same tenant would supersede a pending one unloaded.
        unknown = deploy(db, "ft:tiny-llama:ghost:ftjob-none")
        assert wait_deployment(db, unknown, ACTIVE, FAILED).status == FAILED
        foreign = deploy(db, FT_ONE)  # the default tenant may not deploy another tenant's model
        assert wait_deployment(db, foreign, ACTIVE, FAILED).status == FAILED
        assert _served(client) == "tiny-llama"


def test_start_up_serves_what_the_database_says_is_active(db, finetuned, finetuned_two) -> None:  # type: ignore[no-untyped-def]
    make_model(db, FT_ONE, storage_path=finetuned)
    make_model(db, FT_TWO, storage_path=finetuned_two)
    active = make_deployment(db, FT_ONE, status=ACTIVE, activated_at=utcnow())
    db.commit()
    with app_client() as client:
        assert client.get("/readyz").json()["model"] == FT_ONE
        assert _served(client) == FT_ONE
    # A deployment requested while the service was down is deployed when it starts.
    pending = deploy(db, FT_TWO, publish=False)
    with app_client() as client:
        assert wait_deployment(db, pending, ACTIVE, FAILED).status == ACTIVE
        assert fresh(db, active).status == SUPERSEDED
        wait_until(lambda: _served(client) == FT_TWO, what="new model served")


def test_a_tenant_deployment_changes_only_that_tenant(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    from tests.inference.test_routes import _key

    make_model(db, FT_ONE, storage_path=finetuned, tenant_id="tenant-a")
    db.commit()
    key_a, key_default = _key(db, "tenant-a"), _key(db, "default")
    with app_client(auth_required=True) as client:
        row = deploy(db, FT_ONE, tenant="tenant-a")
        assert wait_deployment(db, row, ACTIVE, FAILED).status == ACTIVE
        ask = {"prompt": "Hello", "max_new_tokens": 2}
        assert (
            client.get("/generate", params=ask, headers={"Authorization": f"Bearer {key_a}"}).json()["model"] == FT_ONE
        )
        other = client.get("/generate", params=ask, headers={"Authorization": f"Bearer {key_default}"})
        assert other.json()["model"] == "tiny-llama"


def test_a_request_running_during_a_swap_stays_on_the_old_model(db, tmp_path, tiny_models, finetuned) -> None:  # type: ignore[no-untyped-def]
    import json

    # A long context, so the old model's generation is still running well after the swap.
    long = copy_model(tiny_models["tiny-llama"], tmp_path / "long", config_changes={"max_position_embeddings": 40_000})
    make_model(db, FT_ONE, storage_path=finetuned)
    db.commit()
    overrides = {"base_models": {"tiny-long": str(long)}, "default_base_model": "tiny-long"}
    with app_client(max_new_tokens_limit=30_000, **overrides) as client:
        body = {"prompt": "Hello", "max_new_tokens": 30_000, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/generate", json=body) as response:
            events = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {"))
            assert next(events)["model"] == "tiny-long"
            row = deploy(db, FT_ONE)
            assert wait_deployment(db, row, ACTIVE, FAILED).status == ACTIVE
            assert _served(client) == FT_ONE  # new requests get the new model...
            later = [next(events) for _ in range(50)]
            # ...while the one that started before the swap keeps streaming from the old one.
            assert {e["model"] for e in later} == {"tiny-long"}
            assert all("finish_reason" not in e for e in later)
            assert client.app.state.registry.loaded("tiny-long").engine.running == 1  # type: ignore[attr-defined]


def test_a_deployment_whose_load_keeps_killing_the_process_is_failed_not_retried(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    # What three crashed loads leave behind: this replica's row still "loading" with three attempts counted, under
    # the replica's name (which its restarts keep). Each attempt is committed before the load starts, so a load
    # that takes the process down is counted too.
    make_model(db, FT_ONE, storage_path=finetuned)
    db.commit()
    row = deploy(db, FT_ONE, status="loading", publish=False)
    replica_row(db, row, "replica-a", state="loading", load_attempts=3)
    with app_client(inference_replica_id="replica-a") as client:
        failed = wait_deployment(db, row, FAILED, ACTIVE)
        assert failed.status == FAILED and "not tried again" in (failed.reason or "")
        assert _served(client) == "tiny-llama"


def test_another_replicas_crashes_are_not_counted_against_this_one(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    make_model(db, FT_ONE, storage_path=finetuned)
    db.commit()
    row = deploy(db, FT_ONE, status="loading", publish=False)
    replica_row(db, row, "replica-a", state="loading", load_attempts=3, heartbeat_minutes_ago=10)
    with app_client(inference_replica_id="replica-b") as client:
        assert wait_deployment(db, row, FAILED, ACTIVE).status == ACTIVE
        assert _served(client) == FT_ONE
    assert replica_states(db, row) == {"replica-a": "loading", "replica-b": "active"}


def test_each_load_is_counted_before_it_starts(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    make_model(db, FT_ONE, storage_path=finetuned)
    db.commit()
    with app_client():
        row = wait_deployment(db, deploy(db, FT_ONE), ACTIVE, FAILED)
        assert row.status == ACTIVE and row.load_attempts == 1


def test_a_deleted_model_stops_answering_at_the_next_poll(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import delete

    from core.orm import ModelRecord

    make_model(db, FT_ONE, storage_path=finetuned)
    db.commit()
    ask = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "model": FT_ONE}
    with app_client(deployment_poll_seconds=0.5) as client:
        first = client.post("/v1/chat/completions", json=ask)
        assert first.status_code == 200 and first.json()["model"] == FT_ONE  # loaded on demand
        assert client.app.state.registry.loaded(FT_ONE) is not None  # type: ignore[attr-defined]
        db.execute(delete(ModelRecord).where(ModelRecord.id == FT_ONE))  # what DELETE /v1/models/{id} commits
        db.commit()
        wait_until(
            lambda: client.post("/v1/chat/completions", json=ask).status_code == 404,
            what="the deleted model answering 404",
            timeout=10,
        )
        assert client.app.state.registry.loaded(FT_ONE) is None  # type: ignore[attr-defined]
        assert _served(client) == "tiny-llama"


# ------------------------------------------------------------------------------------------------ fairness


def test_one_tenants_flood_of_deploys_costs_another_tenant_one_load(db) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from sqlalchemy import select

    from core.orm import Deployment

    # Tenant A asked for 300 deployments before tenant B asked for one (as a worker or an older api left them:
    # the api's cap would refuse most of these).
    start = utcnow() - timedelta(minutes=5)
    flood = []
    for index in range(300):
        row = make_deployment(db, ("tiny-qwen2", "tiny-llama")[index % 2], tenant_id="tenant-a")
        row.created_at = start + timedelta(milliseconds=index)
        flood.append(row)
    other = make_deployment(db, "tiny-qwen2", tenant_id="tenant-b")
    db.commit()
    with app_client():
        assert wait_deployment(db, other, ACTIVE, FAILED).status == ACTIVE
        newest = wait_deployment(db, flood[-1], ACTIVE, FAILED)
        assert newest.status == ACTIVE
    loads = db.execute(
        select(Deployment.model_id, Deployment.load_attempts, Deployment.status, Deployment.activated_at).where(
            Deployment.tenant_id == "tenant-a"
        )
    ).all()
    # Only the newest of the flood was loaded: the older ones were superseded unloaded, so tenant B waited behind
    # one load of tenant A's rather than three hundred.
    assert sum(1 for _, attempts, _, _ in loads if attempts > 0) == 1
    older = [r for r in loads if r.activated_at is None]
    assert len(older) == 299 and {r.status for r in older} == {SUPERSEDED}
    assert fresh(db, other).load_attempts == 1
