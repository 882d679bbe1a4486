"""Two real inference replicas with INFERENCE_BACKEND=vllm, each supervising its own vLLM server, on one database
and one model store; one of them cannot load a tenant's new adapter.

vLLM itself refuses the adapter there: the new fine-tune was trained with LoRA rank 16 and that replica's server
was started with ``--max-lora-rank 8`` (VLLM_MAX_LORA_RANK), as a replica on an older or smaller configuration
would be. The deployment still becomes active (the other replica loaded it), the refusing replica records its own
failed state with vLLM's reason, keeps serving the tenant's previous adapter and the other tenants' adapters, and
says it is degraded in ``/readyz``. Then the vLLM server of that replica is killed: its supervisor starts it again
and loads its adapters again, while the other replica keeps answering.

Two vLLM server starts for the module (plus the restart after the kill): the replicas are started once, and the
tests run in order on them. The model is test_vllm.py's tiny random Llama in float32. Skipped only when vLLM's
environment (scripts/vllm_env.sh) is absent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from core.api_keys import create_api_key
from core.db import get_engine, session_scope
from core.orm import DEFAULT_TENANT, Base, Deployment, DeploymentReplica
from tests.factories import fresh, make_model
from tests.inference.helpers import ACTIVE, FAILED, deploy, replica_states, wait_deployment
from tests.inference.test_vllm import build_vllm_model
from tests.polling import wait_until
from tests.processes import ServiceProcess, free_port, uvicorn_process

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason=f"vLLM's environment is absent ({VLLM_PYTHON}); run scripts/vllm_env.sh"
    ),
]

BASE = "tiny-vllm"
TENANT = "tenant-r"  # its previous fine-tune (rank 8), then a new one (rank 16)
OTHER = "tenant-s"  # another tenant's fine-tune (rank 8), untouched by the failure
FT_OLD = "ft:tiny-vllm:old:ftjob-r1"
FT_NEW = "ft:tiny-vllm:new:ftjob-r2"
FT_OTHER = "ft:tiny-vllm:other:ftjob-s1"
GOOD, BAD = "replica-wide", "replica-narrow"
PROMPT = [1, 50, 60, 70, 80]
START_SECONDS = 600  # two vLLM servers starting at once on a shared 2-core machine


def build_finetune(base: Path, folder: Path, *, rank: int, seed: int) -> Path:
    """As the worker publishes a fine-tune: the merged weights with the base's files, and the PEFT adapter (of
    ``rank``, random non-zero weights) in ``adapter/``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(
        r=rank, lora_alpha=8 * rank, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model: Any = get_peft_model(model, lora)
    peft_model.save_pretrained(str(folder / "adapter"))
    peft_model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    return folder


class Replica:
    """One inference service process with INFERENCE_BACKEND=vllm (it starts its own vLLM server)."""

    def __init__(self, name: str, base: Path, root: Path, *, max_lora_rank: int) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            "INFERENCE_REPLICA_ID": name,
            "AUTH_REQUIRED": "true",
            "BASE_MODELS": json.dumps({BASE: str(base)}),
            "DEFAULT_BASE_MODEL": BASE,
            "GGUF_CACHE": str(root / f"{name}-cache"),  # this replica's reference answers (the fidelity gate's)
            "DATA_DIR": str(root / f"{name}-data"),  # its vLLM server's log kept with the test's files
            "INFERENCE_BACKEND": "vllm",
            "INFERENCE_THREADS": "1",  # each vLLM server takes one core of the two
            "VLLM_PYTHON": str(VLLM_PYTHON),
            "VLLM_DTYPE": "float32",
            "VLLM_MAX_MODEL_LEN": "512",
            "VLLM_CPU_KVCACHE_GIB": "1",
            "VLLM_MAX_LORA_RANK": str(max_lora_rank),
            "VLLM_START_TIMEOUT_SECONDS": str(START_SECONDS),
        }
        self.process: ServiceProcess = uvicorn_process(name, "inference.app:create_app", self.port, root, env=env)
        self.admin = ""

    def wait_ready(self) -> None:
        self.process.wait_http(f"{self.base}/readyz", timeout=START_SECONDS)

    def readyz(self, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.base}/readyz", headers=headers, timeout=30)

    def vllm(self) -> dict[str, Any]:
        """This replica's vLLM server as its admin ``/readyz`` reports it (url, pid, restarts, health)."""
        (server,) = self.readyz(self.admin).json()["vllm"]
        return dict(server)

    def default_model(self, key: str) -> str:
        """The model this replica answers the key's tenant with when the request names none."""
        response = httpx.post(
            f"{self.base}/generate",
            json={"prompt": "Hello", "max_new_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return str(response.headers["x-conch-model"])

    def complete(self, key: str, model: str) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        response = httpx.post(
            f"{self.base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-conch-model"] == model
        return str(response.json()["choices"][0]["text"])

    def served_name(self, model: str) -> str:
        """The name ``model`` has inside this replica's vLLM server (one per load: ``<model>@<n>``)."""
        listed = httpx.get(f"{self.vllm()['url']}/v1/models", timeout=30).json()["data"]
        (name,) = [entry["id"] for entry in listed if entry["id"].startswith(f"{model}@")]
        return str(name)

    def direct(self, model: str) -> str:
        """vLLM's own answer for ``model`` on this replica's server, at temperature 0."""
        body = {"model": self.served_name(model), "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        response = httpx.post(f"{self.vllm()['url']}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])


@dataclass
class Cluster:
    good: Replica  # VLLM_MAX_LORA_RANK=16
    bad: Replica  # VLLM_MAX_LORA_RANK=8: its vLLM refuses the rank-16 adapter
    keys: dict[str, str]  # tenant -> API key
    new_deployment: Deployment


def _empty_tables() -> None:
    """Every table empty before the replicas start (earlier modules' active deployments would be theirs to load)."""
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="module")
def cluster(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Both replicas started (each with its own vLLM server), the tenant's old fine-tune and the other tenant's
    deployed and active on both, then the tenant's new rank-16 fine-tune deployed and settled on both."""
    from core.db import get_sessionmaker

    root = tmp_path_factory.mktemp("vllm-replicas")
    base = build_vllm_model(root / BASE)
    old = build_finetune(base, root / "ft-old", rank=8, seed=1)
    new = build_finetune(base, root / "ft-new", rank=16, seed=2)
    other = build_finetune(base, root / "ft-other", rank=8, seed=3)
    _empty_tables()
    good = Replica(GOOD, base, root, max_lora_rank=16)
    bad = Replica(BAD, base, root, max_lora_rank=8)
    session = get_sessionmaker()()
    try:
        good.process.start()
        bad.process.start()
        good.wait_ready()
        bad.wait_ready()
        with session_scope() as scoped:
            admin = create_api_key(scoped, DEFAULT_TENANT, "replicas-admin", admin=True)
            keys = {TENANT: create_api_key(scoped, TENANT, "t"), OTHER: create_api_key(scoped, OTHER, "o")}
        good.admin = bad.admin = admin
        make_model(session, FT_OLD, storage_path=old, tenant_id=TENANT, base_model=BASE)
        make_model(session, FT_NEW, storage_path=new, tenant_id=TENANT, base_model=BASE)
        make_model(session, FT_OTHER, storage_path=other, tenant_id=OTHER, base_model=BASE)
        session.commit()
        first = [deploy(session, FT_OLD, tenant=TENANT), deploy(session, FT_OTHER, tenant=OTHER)]
        for row in first:

            def both_active(row: Deployment = row) -> bool:
                return replica_states(session, row) == {GOOD: ACTIVE, BAD: ACTIVE}

            wait_until(
                both_active,
                timeout=300,
                what=f"both replicas serving {row.model_id}",
                logs=lambda: good.process.log()[-3000:] + bad.process.log()[-3000:],
            )
        new_row = deploy(session, FT_NEW, tenant=TENANT)
        wait_deployment(session, new_row, ACTIVE, FAILED, timeout=300)
        wait_until(
            lambda: (
                set(replica_states(session, new_row).values()) <= {ACTIVE, FAILED}
                and len(replica_states(session, new_row)) == 2
            ),
            timeout=300,
            what="both replicas done with the new deployment",
        )
        yield Cluster(good, bad, keys, new_row)
    finally:
        session.close()
        good.process.stop()
        bad.process.stop()


def test_a_replica_whose_vllm_refuses_the_adapter_keeps_serving_and_the_other_serves_it(cluster: Cluster) -> None:
    good, bad, keys = cluster.good, cluster.bad, cluster.keys
    with session_scope() as session:
        row = fresh(session, cluster.new_deployment)
        assert row.status == ACTIVE  # the wide replica loaded it; the narrow one's failure did not fail it
        replicas = {
            r.replica_id: r
            for r in session.scalars(select(DeploymentReplica).where(DeploymentReplica.deployment_id == row.id))
        }
        assert replicas[GOOD].state == ACTIVE and replicas[GOOD].reason is None
        assert replicas[BAD].state == FAILED
        reason = replicas[BAD].reason or ""
        assert "rank" in reason.lower() and "16" in reason, reason  # vLLM's own refusal, kept for the operator
        public_id = row.public_id

    # The wide replica serves the new adapter: its tokens are its vLLM server's own answer at temperature 0.
    assert good.default_model(keys[TENANT]) == FT_NEW
    new_answer = good.complete(keys[TENANT], FT_NEW)
    assert new_answer == good.direct(FT_NEW)

    # The narrow one serves the tenant's previous adapter and the other tenant's, each as its vLLM answers them.
    assert bad.default_model(keys[TENANT]) == FT_OLD
    assert bad.default_model(keys[OTHER]) == FT_OTHER
    old_answer = bad.complete(keys[TENANT], FT_OLD)
    assert old_answer == bad.direct(FT_OLD)
    assert old_answer != new_answer  # a different adapter answers there
    assert bad.complete(keys[OTHER], FT_OTHER) == bad.direct(FT_OTHER)
    assert not [m for m in httpx.get(f"{bad.vllm()['url']}/v1/models").json()["data"] if FT_NEW in m["id"]]
    assert good.complete(keys[OTHER], FT_OTHER) == good.direct(FT_OTHER)

    # Ready (every tenant is answered) but degraded; which deployment failed and why only for an admin key.
    public = bad.readyz()
    assert public.status_code == 200 and public.json() == {"status": "ready", "degraded": True}
    detail = bad.readyz(bad.admin).json()
    assert detail["status"] == "ready" and detail["degraded"] is True
    (failure,) = detail["failed_deployments"]
    assert failure["deployment"] == public_id and failure["model"] == FT_NEW and failure["tenant"] == TENANT
    assert "rank" in failure["reason"].lower()
    assert good.readyz().json() == {"status": "ready"}
    assert "failed_deployments" not in good.readyz(good.admin).json()


def test_a_killed_vllm_server_comes_back_with_its_adapters_while_the_other_replica_answers(
    cluster: Cluster,
) -> None:
    good, bad, keys = cluster.good, cluster.bad, cluster.keys
    before = {FT_OLD: bad.complete(keys[TENANT], FT_OLD), FT_OTHER: bad.complete(keys[OTHER], FT_OTHER)}
    new_answer = good.complete(keys[TENANT], FT_NEW)
    server = bad.vllm()
    assert server["adapters"] >= 2 and server["healthy"]
    os.killpg(server["pid"], signal.SIGKILL)  # the server's whole process group (its watchdog, server, workers)

    # The other replica keeps answering the tenant with the new adapter all along.
    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []

    def client_loop() -> None:
        while not stop.is_set():
            try:
                answered.append(good.complete(keys[TENANT], FT_NEW))
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(str(exc)[:300])
            stop.wait(1.0)  # a request a second: the restarting server shares the two cores with this one

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        wait_until(lambda: bad.readyz().status_code == 503, timeout=60, what="/readyz 503 while vLLM restarts")
        wait_until(
            lambda: (s := bad.vllm())["restarts"] > server["restarts"] and s["healthy"],
            timeout=START_SECONDS,
            interval=1,
            what="the narrow replica's vLLM server restarted",
            logs=lambda: bad.process.log()[-3000:],
        )
        wait_until(lambda: bad.readyz().status_code == 200, timeout=60, what="/readyz 200 again")
    finally:
        stop.set()
        thread.join(180)
    assert failures == [] and answered and set(answered) == {new_answer}

    assert bad.vllm()["pid"] != server["pid"]
    # Its adapters were loaded again on the new process: same answers, as vLLM gives them directly.
    assert bad.complete(keys[TENANT], FT_OLD) == before[FT_OLD] == bad.direct(FT_OLD)
    assert bad.complete(keys[OTHER], FT_OTHER) == before[FT_OTHER] == bad.direct(FT_OTHER)
    # The refused deployment stays refused here (recorded in the database, not in the dead process) and active.
    with session_scope() as session:
        assert fresh(session, cluster.new_deployment).status == ACTIVE
    assert replica_states_now(cluster.new_deployment) == {GOOD: ACTIVE, BAD: FAILED}
    assert bad.readyz().json() == {"status": "ready", "degraded": True}


def replica_states_now(row: Deployment) -> dict[str, str]:
    with session_scope() as session:
        return replica_states(session, row)
