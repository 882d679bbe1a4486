"""Two real inference replicas on one database, one of which cannot load the deployed model: the deployment stays
active, the good replica serves the new model, the bad one keeps serving the previous one and its ``/readyz`` says
which tenant model it failed (to an admin key; an outsider learns only that it is degraded)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from core.api_keys import create_api_key
from core.db import session_scope
from tests.factories import fresh, make_model
from tests.inference.helpers import ACTIVE, FAILED, deploy, replica_states, wait_deployment
from tests.polling import wait_until
from tests.processes import ServiceProcess, free_port, uvicorn_process

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_db", "tiny_models")]

FT_ONE = "ft:tiny-llama:one:ftjob-0001"


class Replica:
    def __init__(self, name: str, log_dir: Path, cache: Path) -> None:
        self.name = name
        self.cache = cache
        self.port = free_port()
        env = {"INFERENCE_REPLICA_ID": name, "GGUF_CACHE": str(cache), "AUTH_REQUIRED": "true"}
        self.process: ServiceProcess = uvicorn_process(name, "inference.app:create_app", self.port, log_dir, env=env)
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        self.process.start()
        self.process.wait_http(f"{self.base}/readyz", timeout=180)
        return self

    def served(self, key: str) -> str:
        response = httpx.get(
            f"{self.base}/generate",
            params={"prompt": "Hello", "max_new_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["model"])

    def readyz(self, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.base}/readyz", headers=headers, timeout=30)


@pytest.fixture
def replicas(log_dir: Path, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    good = Replica("replica-good", log_dir, tmp_path / "good-cache")
    bad = Replica("replica-bad", log_dir, tmp_path / "bad-cache")
    try:
        yield good.start(), bad.start()
    finally:
        good.process.stop()
        bad.process.stop()


def test_a_replica_that_cannot_load_keeps_its_model_and_the_deployment_stays_active(
    db: Session, finetuned: Path, replicas: tuple[Replica, Replica]
) -> None:
    good, bad = replicas
    with session_scope() as session:
        admin = create_api_key(session, "default", "replicas-test", admin=True)
    make_model(db, FT_ONE, storage_path=finetuned)
    db.commit()
    # Both replicas serve a first deployment (the model the bad one will keep).
    first = deploy(db, "tiny-qwen2")
    wait_until(
        lambda: replica_states(db, first) == {"replica-good": "active", "replica-bad": "active"},
        timeout=180,
        what="both replicas serving the first deployment",
    )
    assert good.served(admin) == "tiny-qwen2" and bad.served(admin) == "tiny-qwen2"
    # The bad replica's local export cache breaks (a full or failed disk on its host): every new model it loads
    # needs its exports and reference answers written there, so it cannot load one; the good replica's is fine.
    shutil.rmtree(bad.cache)
    bad.cache.write_text("not a folder")

    row = deploy(db, FT_ONE)
    assert wait_deployment(db, row, ACTIVE, FAILED, timeout=180).status == ACTIVE
    wait_until(
        lambda: replica_states(db, row) == {"replica-good": "active", "replica-bad": "failed"},
        timeout=180,
        what="both replicas done with the deployment",
    )
    assert fresh(db, row).status == ACTIVE  # the late failure did not flip it
    assert good.served(admin) == FT_ONE
    assert bad.served(admin) == "tiny-qwen2"  # the previous model keeps answering on the bad replica

    public = bad.readyz()
    assert public.status_code == 200 and public.json() == {"status": "ready", "degraded": True}
    detailed = bad.readyz(admin).json()
    assert detailed["status"] == "ready" and detailed["degraded"] is True
    (failure,) = detailed["failed_deployments"]
    assert failure["model"] == FT_ONE and failure["tenant"] == "default" and failure["reason"]
    assert failure["deployment"] == row.public_id
    assert str(bad.cache.parent) not in bad.readyz(admin).text  # no server folder, even for an admin
    assert good.readyz().json() == {"status": "ready"}
    assert "failed_deployments" not in good.readyz(admin).json()
