"""INFERENCE_BACKEND=vllm: Conch's inference service in front of a supervised vLLM server.

One vLLM server start per module (about 35 s on a CPU): the tests share one app. The model is a tiny random Llama
with 64-wide attention heads (vLLM's CPU attention has no kernel for the 16-wide heads of tests/tiny_models.py),
served in float32 (its bfloat16 kernels stop this CPU's worker on such small shapes), and a fine-tune is the same
folder with a PEFT adapter trained on it, published where the worker publishes one (``<folder>/adapter``).
Skipped only when vLLM's environment (scripts/vllm_env.sh) is absent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from core.api_keys import create_api_key
from core.db import session_scope
from core.orm import Checkpoint
from inference.vllm.engine import VllmEngine
from inference.vllm.server import VllmServer
from tests.factories import make_job, make_model
from tests.inference.helpers import ACTIVE, FAILED, app_client, deploy, wait_deployment
from tests.polling import wait_until
from tests.tiny_models import build_tokenizer

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(), reason=f"vLLM's environment is absent ({VLLM_PYTHON}); run scripts/vllm_env.sh"
)

BASE = "tiny-vllm"
TENANT = "tenant-v"
OTHER = "tenant-w"
FT = "ft:tiny-vllm:persona:ftjob-v1"
PROMPT = [1, 50, 60, 70, 80]


def build_vllm_model(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,  # answers that depend on the context (and on the adapter)
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def save_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A PEFT adapter "trained" on ``base`` (random, non-zero LoRA weights), as the worker saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder))
    return folder


def build_finetune(base: Path, folder: Path) -> Path:
    """As the worker publishes a fine-tune: the merged weights with the base's tokenizer, and the adapter in
    ``adapter/`` (the fidelity gate holds vLLM's adapter answers to the merged weights' fp32 reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, folder)
    save_adapter(base, folder / "adapter", seed=1)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder / "adapter"))
    merged.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The base, a published fine-tune of it, and a training checkpoint of that fine-tune's job (its adapter)."""
    root = tmp_path_factory.mktemp("vllm-models")
    base = build_vllm_model(root / BASE)
    return base, build_finetune(base, root / "ft"), save_adapter(base, root / "ckpt-step-5", seed=2)


def bearer(tenant: str, *, admin: bool = False) -> dict[str, str]:
    """The Authorization header of a new API key of ``tenant``."""
    with session_scope() as session:
        return {"Authorization": f"Bearer {create_api_key(session, tenant, 'test', admin=admin)}"}


@contextmanager
def vllm_app(base: Path, *, kv_gib: int = 1, start_timeout: float = 240) -> Iterator[TestClient]:
    """Conch's inference service on INFERENCE_BACKEND=vllm over the tiny model ``base`` (float32, a small cache,
    LoRA rank up to 8), once /readyz says its vLLM server is up."""
    with app_client(
        wait_ready=False,
        base_models={BASE: str(base)},
        default_base_model=BASE,
        inference_backend="vllm",
        auth_required=True,
        vllm_python=VLLM_PYTHON,
        vllm_dtype="float32",
        vllm_max_model_len=512,
        vllm_cpu_kvcache_gib=kv_gib,
        vllm_max_lora_rank=8,
        vllm_start_timeout_seconds=start_timeout,
    ) as client:
        # A vLLM server starts in about 35 s on a CPU alone, minutes while other work shares it.
        ready = lambda: client.get("/readyz").status_code == 200  # noqa: E731
        wait_until(ready, timeout=start_timeout + 60, interval=0.5, what="/readyz 200")
        yield client


@pytest.fixture(scope="module")
def vllm_client(database: str, vllm_models: tuple[Path, Path, Path]) -> Iterator[TestClient]:
    with vllm_app(vllm_models[0]) as client:
        yield client


def _registry(client: TestClient) -> Any:
    return client.app.state.registry  # type: ignore[attr-defined]


def _server(client: TestClient) -> VllmServer:
    servers = _registry(client).vllm.servers()
    assert len(servers) == 1
    return servers[0]


def _conch(client: TestClient, model: str, headers: dict[str, str], prompt: list[int] = PROMPT) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-conch-model"] == model
    return dict(response.json())


def _direct(server: VllmServer, served: str, prompt: list[int] = PROMPT) -> str:
    body = {"model": served, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


@pytest.fixture
def tenant_models(db: Any, vllm_models: tuple[Path, Path, Path], vllm_client: TestClient) -> dict[str, str]:
    _, finetune, checkpoint = vllm_models
    make_model(db, FT, storage_path=finetune, tenant_id=TENANT, base_model=BASE)
    job = make_job(db, tenant_id=TENANT, model=BASE, status="succeeded", fine_tuned_model=FT)
    db.add(Checkpoint(job_id=job.id, step=5, storage_path=str(checkpoint)))
    db.commit()
    return bearer(TENANT)


def test_base_and_adapter_answer_through_conch_as_vllm_answers_directly(
    vllm_client: TestClient, tenant_models: dict[str, str]
) -> None:
    headers = tenant_models
    server = _server(vllm_client)
    base = _conch(vllm_client, BASE, headers)
    tuned = _conch(vllm_client, FT, headers)
    handle = _registry(vllm_client).loaded(FT)
    assert isinstance(handle.engine, VllmEngine)
    assert handle.engine.server is server  # the adapter runs on the base's server, no second process
    assert handle.model.route == "vllm:lora"
    # Both passed the fidelity gate: vLLM's next tokens against the fp32 reference (for the adapter, of the merged
    # weights), teacher-forced on the golden prompts.
    for name in (BASE, FT):
        gate = _registry(vllm_client).loaded(name).gate
        assert gate is not None and gate.passed and gate.fidelity.tokens > 0, name
    assert base["choices"][0]["text"] == _direct(server, BASE)
    assert tuned["choices"][0]["text"] == _direct(server, handle.engine.served_name)
    assert tuned["choices"][0]["text"] != base["choices"][0]["text"]  # the adapter changes the answer
    assert tuned["usage"]["completion_tokens"] >= 1
    # Streaming goes through the same engine.
    with vllm_client.stream(
        "POST",
        "/v1/completions",
        json={"model": FT, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True},
        headers=headers,
    ) as stream:
        assert stream.status_code == 200
        lines = [line for line in stream.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(c["text"] for line in lines for c in json.loads(line[6:]).get("choices", []))
    assert streamed == tuned["choices"][0]["text"]


def test_another_tenant_cannot_reach_the_adapter(vllm_client: TestClient, tenant_models: dict[str, str]) -> None:
    _conch(vllm_client, FT, tenant_models)  # loaded on the server now
    other = bearer(OTHER)
    response = vllm_client.post("/v1/completions", json={"model": FT, "prompt": PROMPT, "max_tokens": 2}, headers=other)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    served = _registry(vllm_client).loaded(FT).engine.served_name
    response = vllm_client.post("/v1/completions", json={"model": served, "prompt": PROMPT}, headers=other)
    assert response.status_code == 404  # nor by the name it has inside vLLM


def test_swap_to_the_adapter_under_load_fails_no_request(
    db: Any, vllm_client: TestClient, tenant_models: dict[str, str]
) -> None:
    headers = tenant_models
    _registry(vllm_client).set_default(TENANT, BASE)
    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []

    def client_loop() -> None:
        while not stop.is_set():
            response = vllm_client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4}, headers=headers)
            if response.status_code == 200:
                answered.append(response.headers["x-conch-model"])
            else:
                failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 8, what="answers from the base")
        row = deploy(db, FT, tenant=TENANT)
        assert wait_deployment(db, row, ACTIVE, FAILED, timeout=120).status == ACTIVE
        seen = len(answered)
        wait_until(lambda: answered[seen:].count(FT) >= 8, what="answers from the adapter")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert answered[0] == BASE and answered[-1] == FT


def test_a_killed_vllm_server_comes_back_with_its_adapters(
    vllm_client: TestClient, tenant_models: dict[str, str]
) -> None:
    headers = tenant_models
    before = _conch(vllm_client, FT, headers)["choices"][0]["text"]
    server = _server(vllm_client)
    restarts, pid = server.restarts, server.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: vllm_client.get("/readyz").status_code == 503, what="/readyz 503 while it restarts")
    wait_until(lambda: server.restarts > restarts and server.healthy, timeout=300, what="vLLM restarted")
    assert vllm_client.get("/readyz").status_code == 200
    assert server.pid != pid
    # The adapter is back on the new process (the registry of adapters survives it), same answer.
    assert _conch(vllm_client, FT, headers)["choices"][0]["text"] == before
    assert _conch(vllm_client, BASE, headers)["choices"][0]["text"] == _direct(server, BASE)


def test_a_checkpoint_answers_as_its_adapter_on_the_base(
    vllm_client: TestClient, tenant_models: dict[str, str]
) -> None:
    headers = tenant_models
    name = f"{FT}:ckpt-step-5"
    answer = _conch(vllm_client, name, headers)["choices"][0]["text"]
    handle = _registry(vllm_client).loaded(name)
    assert handle.engine.server is _server(vllm_client) and handle.model.route == "vllm:lora"
    assert answer == _direct(_server(vllm_client), handle.engine.served_name)
    assert answer != _conch(vllm_client, FT, headers)["choices"][0]["text"]  # step 5's weights, not the final ones
    # Listed among the tenant's models (and only theirs), as the model it answers as.
    assert name in [m["id"] for m in vllm_client.get("/v1/models", headers=headers).json()["data"]]
    listed = vllm_client.get(f"/v1/models/{name}", headers=headers).json()
    assert listed["base_model"] == BASE and listed["ready"] is True and listed["loaded"] is True
    assert name not in [m["id"] for m in vllm_client.get("/v1/models", headers=bearer(OTHER)).json()["data"]]
    missing = vllm_client.post(
        "/v1/completions", json={"model": f"{FT}:ckpt-step-6", "prompt": PROMPT}, headers=headers
    )
    assert missing.status_code == 404
    other = vllm_client.post("/v1/completions", json={"model": name, "prompt": PROMPT}, headers=bearer(OTHER))
    assert other.status_code == 404


def test_an_adapter_that_does_not_answer_as_its_merged_weights_is_refused(
    db: Any, vllm_models: tuple[Path, Path, Path], vllm_client: TestClient, tenant_models: dict[str, str]
) -> None:
    base, finetune, _ = vllm_models
    # The base's weights published beside the fine-tune's adapter: the reference (fp32, of the published weights)
    # and vLLM's adapter answers disagree, so the fidelity gate refuses the deployment.
    broken = base.parent / "ft-broken"
    if not broken.exists():
        shutil.copytree(base, broken)
        shutil.copytree(finetune / "adapter", broken / "adapter")
    name = "ft:tiny-vllm:broken:ftjob-v2"
    make_model(db, name, storage_path=broken, tenant_id=TENANT, base_model=BASE)
    db.commit()
    row = deploy(db, name, tenant=TENANT)
    failed = wait_deployment(db, row, ACTIVE, FAILED, timeout=120)
    assert failed.status == FAILED
    assert "drift from the model's fp32 reference" in (failed.reason or "")
    assert _registry(vllm_client).loaded(name) is None
    assert not [served for served in _server(vllm_client).adapters if served.startswith(name)]  # unloaded again
