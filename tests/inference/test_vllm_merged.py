"""INFERENCE_BACKEND=vllm, a deployment ``serve_as: merged``: the fine-tune's merged folder on a vLLM server of its
own, swapped in blue/green against the same fine-tune served as its adapter on the base's server, and back by a
rollback, which keeps the way the deployment it returns to served.

One extra vLLM server start beside the base's (the merged one), so one module fixture and one test; the models
are test_vllm.py's (a tiny random Llama with 64-wide heads, float32). Skipped only when vLLM's environment
(scripts/vllm_env.sh) is absent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from core.deployments import announce, request_deployment, rollback_entry
from core.orm import Deployment
from core.settings import get_settings
from inference.vllm.server import VllmServer
from tests.factories import make_model
from tests.inference.helpers import ACTIVE, FAILED, wait_deployment
from tests.inference.test_vllm import VLLM_PYTHON, bearer, build_finetune, build_vllm_model, vllm_app
from tests.polling import wait_until

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(), reason=f"vLLM's environment is absent ({VLLM_PYTHON}); run scripts/vllm_env.sh"
)

BASE = "tiny-vllm"
TENANT = "tenant-m"
FT = "ft:tiny-vllm:merged:ftjob-m1"
PROMPT = [1, 50, 60, 70, 80]
KV_GIB = 1


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm-merged")
    base = build_vllm_model(root / BASE)
    return base, build_finetune(base, root / "ft")


@pytest.fixture(scope="module")
def vllm_client(database: str, vllm_models: tuple[Path, Path]) -> Iterator[TestClient]:
    with vllm_app(vllm_models[0], kv_gib=KV_GIB, start_timeout=600) as client:
        yield client


def _deploy(session: Session, model: str, serve_as: str | None, *, rollback: bool = False) -> Deployment:
    """A deployment row as the api commits it (``serve_as`` checked there), then the pub/sub announcement."""
    row = request_deployment(
        session,
        tenant_id=TENANT,
        model_id=model,
        requested_by="rollback:test" if rollback else "test",
        serve_as=serve_as,
    )
    session.commit()
    announce(row, get_settings())
    return row


def _registry(client: TestClient) -> Any:
    return client.app.state.registry  # type: ignore[attr-defined]


def _conch(client: TestClient, headers: dict[str, str]) -> str:
    body = {"model": FT, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def _direct(server: VllmServer, served: str) -> str:
    body = {"model": served, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


class Clients:
    """Four clients asking the tenant's default model (no model named) in a loop, counting every failure."""

    def __init__(self, client: TestClient, headers: dict[str, str]) -> None:
        self.client, self.headers = client, headers
        self.answered: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(4)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            response = self.client.post(
                "/generate", json={"prompt": "Hello", "max_new_tokens": 4}, headers=self.headers
            )
            if response.status_code == 200:
                self.answered.append(response.headers["x-conch-model"])
            else:
                self.failures.append(f"{response.status_code} {response.text[:200]}")

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: len(self.answered) >= 4, what="answers before the switch")
        return self

    def more(self, count: int) -> None:
        seen = len(self.answered)
        wait_until(lambda: len(self.answered) >= seen + count, what=f"{count} more answers")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


# Two vLLM servers of one service on one CPU host: each computes on cores of its own (inference/vllm/cores.py).
# When both bound core 0 (vLLM's automatic binding), the merged server's start stalled past 600 s behind the busy
# base server.
def test_a_merged_deployment_runs_on_its_own_server_swapped_blue_green(
    db: Any, vllm_models: tuple[Path, Path], vllm_client: TestClient
) -> None:
    _, finetune = vllm_models
    make_model(db, FT, storage_path=finetune, tenant_id=TENANT, base_model=BASE)
    db.commit()
    headers = bearer(TENANT)
    registry = _registry(vllm_client)
    (base_server,) = registry.vllm.servers()

    # As its adapter on the base's server (vLLM's default way): it counts its adapter's size only.
    adapter_row = _deploy(db, FT, "adapter")
    assert wait_deployment(db, adapter_row, ACTIVE, FAILED, timeout=120).status == ACTIVE
    adapter = registry.loaded(FT)
    assert adapter.model.route == "vllm:lora" and adapter.engine.server is base_server
    assert adapter.model.cache_bytes == 0 and adapter.model.size_bytes < 1024**2
    assert registry.loaded(BASE).model.cache_bytes == KV_GIB * 1024**3  # the base owns its server's KV cache

    # Merged, while four clients keep asking the tenant's default: the merged server starts and passes the
    # fidelity gate before the switch, the adapter keeps answering until then, and no request fails.
    with Clients(vllm_client, headers) as clients:
        merged_row = _deploy(db, FT, "merged")
        merged_row = wait_deployment(db, merged_row, ACTIVE, FAILED, timeout=700)
        assert merged_row.status == ACTIVE, merged_row.reason
        clients.more(8)
    assert clients.failures == []
    assert set(clients.answered) == {FT}
    assert merged_row.serve_as == "merged" and merged_row.route == "vllm:float32"

    merged = registry.loaded(FT)
    server = merged.engine.server
    assert merged is not adapter and merged.model.route == "vllm:float32"
    assert server is not base_server and server.folder == finetune and server.adapters == {}
    assert merged.gate is not None and merged.gate.passed
    # It answers as the merged weights: what that server (started on the merged folder, no adapter) answers.
    assert _conch(vllm_client, headers) == _direct(server, FT)
    # The budget counts the merged server's KV cache beside its weights.
    assert merged.model.cache_bytes == KV_GIB * 1024**3
    ready = vllm_client.get("/readyz", headers=bearer("ops", admin=True)).json()
    assert sorted(s["model"] for s in ready["vllm"]) == sorted([BASE, FT])
    listed = {m["id"]: m for m in ready["models"]}
    assert listed[FT]["route"] == "vllm:float32" and listed[FT]["bytes"] > KV_GIB * 1024**3
    # The adapter's engine was unloaded once no request held it: its adapter left the base's server.
    wait_until(lambda: not [n for n in base_server.adapters if n.startswith(FT)], what="the adapter unloaded")

    # A rollback returns to the deployment before, served as it was (the adapter); the merged server stops once
    # nothing uses it.
    entry = rollback_entry(db, TENANT, FT, base_model=BASE, servable=lambda _: True)
    assert entry is not None and (entry.model_id, entry.serve_as) == (FT, "adapter")
    with Clients(vllm_client, headers) as clients:
        back = _deploy(db, FT, entry.serve_as, rollback=True)
        assert wait_deployment(db, back, ACTIVE, FAILED, timeout=120).status == ACTIVE
        clients.more(8)
    assert clients.failures == []
    assert registry.loaded(FT).model.route == "vllm:lora" and registry.loaded(FT).engine.server is base_server
    wait_until(lambda: registry.vllm.servers() == [base_server], what="the merged server stopped")
    assert server.stopped
