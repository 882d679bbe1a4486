"""The servability gate at publish: the worker applies the rules of ``core.servability`` to the adapter it saved
(adapter_config.json, the weights' names and shapes) under its own settings, so a job the api let through (its
settings differ, or the job predates them) fails with ``not_servable`` naming the field, before anything is merged:
no model row, no deployment, no published folder. And the rules agree with a real vLLM 0.32 server: every adapter
it refuses is one the gate refuses, and the ones it loads pass."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import deployments
from core.contracts import JobStatus
from core.db import session_scope
from core.orm import Deployment, ModelRecord
from core.queue import enqueue_fine_tune
from core.servability import adapter_serving
from core.settings import Settings, get_settings
from core.storage import fine_tuned_dir
from tests import polling
from tests.factories import alpaca_records, fresh, job_events, make_file, make_job
from tests.processes import ServiceProcess
from tests.worker.helpers import StartWorker
from worker.pipeline.errors import PipelineError
from worker.pipeline.serving import check_adapter_servable

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
# The worker's settings: the vLLM backend with a limit of 8 (the api that created the jobs served merged models).
WORKER_ENV = {"INFERENCE_BACKEND": "vllm", "VLLM_MAX_LORA_RANK": "8"}


def _settings(**values: Any) -> Settings:
    return get_settings().model_copy(update={"inference_backend": "vllm", "vllm_max_lora_rank": 8, **values})


def save_adapter(base: Path, folder: Path, *, resize: int = 0, **lora: Any) -> Path:
    """A PEFT adapter on ``base`` saved as the worker saves one (``resize``: rows added to the vocabulary first)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    if resize:
        model.resize_token_embeddings(model.config.vocab_size + resize)
    options: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora}
    save_embeddings = options.pop("save_embedding_layers", False)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
    peft_model.save_pretrained(str(folder), save_embedding_layers=save_embeddings)
    return folder


def _problem(adapter: Path, base: str, settings: Settings, *, continued: bool = False) -> tuple[str | None, str]:
    try:
        check_adapter_servable(adapter, base, settings, adapter_serving(settings), continued=continued)
    except PipelineError as exc:
        assert exc.code == "not_servable" and exc.message.startswith(f"{exc.param}: ")
        return exc.param, exc.message
    return None, ""


# ------------------------------------------------------------------------------------------------ the rules at publish


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    llama, qwen2 = tiny_models["tiny-llama"], tiny_models["tiny-qwen2"]
    return {
        "plain": save_adapter(llama, root / "plain"),
        "all": save_adapter(llama, root / "all", target_modules="all-linear"),
        "rank16": save_adapter(llama, root / "rank16", r=16),
        "saved-head": save_adapter(llama, root / "saved-head", modules_to_save=["lm_head"]),
        "dora": save_adapter(llama, root / "dora", use_dora=True),
        "embedding": save_adapter(llama, root / "embedding", target_modules=["q_proj", "embed_tokens"]),
        "resized": save_adapter(llama, root / "resized", resize=8, target_modules=["q_proj", "embed_tokens"]),
        "resized-saved": save_adapter(llama, root / "resized-saved", resize=8, save_embedding_layers=True),
        "qwen2-embedding": save_adapter(qwen2, root / "qwen2-embedding", target_modules=["q_proj", "embed_tokens"]),
    }


@pytest.mark.usefixtures("tiny_models")
def test_adapters_vllm_serves_pass(adapters: dict[str, Path]) -> None:
    for name in ("plain", "all", "embedding"):  # Llama takes LoRA on its embeddings in vLLM (embedding_modules)
        assert _problem(adapters[name], "tiny-llama", _settings()) == (None, ""), name
    assert _problem(adapters["rank16"], "tiny-llama", _settings(vllm_max_lora_rank=16)) == (None, "")


@pytest.mark.usefixtures("tiny_models")
def test_each_rule_names_its_field(adapters: dict[str, Path]) -> None:
    settings = _settings()
    field, message = _problem(adapters["rank16"], "tiny-llama", settings)
    assert field == "lora_rank" and "16 is above the serving limit of 8" in message
    field, message = _problem(adapters["saved-head"], "tiny-llama", settings)
    assert field == "modules_to_save" and "lm_head" in message
    assert _problem(adapters["dora"], "tiny-llama", settings)[0] == "use_dora"
    field, message = _problem(adapters["resized"], "tiny-llama", settings)
    assert field == "vocab_size" and "resized" in message
    field, message = _problem(adapters["resized-saved"], "tiny-llama", settings)
    assert field == "vocab_size" and "resized" in message
    # Qwen2ForCausalLM declares no embedding_modules: vLLM takes no LoRA on its embeddings.
    field, message = _problem(adapters["qwen2-embedding"], "tiny-qwen2", settings)
    assert field == "lora_target" and "'embed_tokens'" in message and "'q_proj'" not in message


@pytest.mark.usefixtures("tiny_models")
def test_the_adapter_must_be_trained_on_the_servers_base(adapters: dict[str, Path]) -> None:
    settings = _settings()
    field, message = _problem(adapters["plain"], "tiny-qwen2", settings)  # trained on tiny-llama
    assert field == "model" and "tiny-llama" in message
    # A job that continued a fine-tune trained on that model's weights: its merged folder is served instead.
    assert _problem(adapters["plain"], "tiny-qwen2", settings, continued=True) == (None, "")


@pytest.mark.usefixtures("tiny_models")
def test_other_backends_refuse_nothing_at_publish(adapters: dict[str, Path]) -> None:
    for backend in ("lean", "auto", "llamacpp", "reference"):
        settings = _settings(inference_backend=backend)
        for name, adapter in adapters.items():
            base = "tiny-qwen2" if name.startswith("qwen2") else "tiny-llama"
            assert _problem(adapter, base, settings) == (None, ""), (backend, name)


# ------------------------------------------------------------------------------------------------ a worker process


@pytest.fixture
def vllm_worker(start_worker: StartWorker) -> ServiceProcess:
    return start_worker("servegate", env=WORKER_ENV)


@pytest.fixture
def live_vllm_replica() -> Iterator[str]:
    """An inference replica that serves adapters up to rank 8 and says so in its heartbeat (the real one's code,
    beating as often as a replica does), for as long as the test runs."""
    name, stop = "vllm-replica", threading.Event()

    def beat() -> None:
        while not stop.is_set():
            with session_scope() as session:
                deployments.heartbeat(session, name, max_lora_rank=8)
            stop.wait(1.0)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    yield name
    stop.set()
    thread.join(10)
    with session_scope() as session:
        deployments.leave(session, name)


@pytest.mark.e2e
@pytest.mark.usefixtures("tiny_models")
def test_a_job_the_workers_engine_cannot_serve_fails_at_publish_and_publishes_nothing(
    db: Session, vllm_worker: ServiceProcess
) -> None:
    refused = make_job(db, make_file(db, alpaca_records(4)), hyperparameters={"lora_rank": 16}, auto_deploy=True)
    served = make_job(db, make_file(db, alpaca_records(4)), hyperparameters={"lora_rank": 8}, auto_deploy=True)
    db.commit()
    for job in (refused, served):
        enqueue_fine_tune(job.public_id, get_settings())
    done: Callable[[], bool] = lambda: all(  # noqa: E731
        fresh(db, job).status in (JobStatus.SUCCEEDED, JobStatus.FAILED) for job in (refused, served)
    )
    polling.wait_until(done, "both jobs to end", timeout=300, interval=0.2)

    row = fresh(db, refused)
    assert row.status == JobStatus.FAILED and row.fine_tuned_model is None, vllm_worker.log()[-3000:]
    assert row.error is not None and (row.error["code"], row.error["param"]) == ("not_servable", "lora_rank")
    assert "VLLM_MAX_LORA_RANK" in row.error["message"] and "16" in row.error["message"]
    assert job_events(db, refused)[-1].level == "error"
    stages = [(e.data or {}).get("stage") for e in job_events(db, refused)]
    assert "training" in stages and "merging" not in stages  # trained, then refused before merging
    assert not fine_tuned_dir(refused.id, get_settings()).exists()

    # The servable one went all the way: its adapter passed the same gate in the same worker.
    row = fresh(db, served)
    assert row.status == JobStatus.SUCCEEDED, row.error
    models = db.scalars(select(ModelRecord)).all()
    assert [m.job_id for m in models] == [served.id]
    assert [d.model_id for d in db.scalars(select(Deployment)).all()] == [row.fine_tuned_model]


@pytest.mark.e2e
@pytest.mark.usefixtures("tiny_models")
def test_a_worker_on_another_backend_is_held_to_a_live_vllm_replicas_limit(
    db: Session, start_worker: StartWorker, live_vllm_replica: str
) -> None:
    """As in ``docker compose --profile vllm``: the worker keeps its own backend (lean here, which serves merged
    weights), and the vLLM replica's advertised limit still refuses the adapter it could not load."""
    worker = start_worker("servegate-lean", env={"INFERENCE_BACKEND": "lean"})
    job = make_job(db, make_file(db, alpaca_records(4)), hyperparameters={"lora_rank": 16})
    db.commit()
    enqueue_fine_tune(job.public_id, get_settings())
    polling.wait_until(
        lambda: fresh(db, job).status in (JobStatus.SUCCEEDED, JobStatus.FAILED), "the job to end", timeout=300
    )
    row = fresh(db, job)
    assert row.status == JobStatus.FAILED and row.error is not None, worker.log()[-3000:]
    assert (row.error["code"], row.error["param"]) == ("not_servable", "lora_rank")
    assert f"inference replica {live_vllm_replica!r}" in row.error["message"]
    assert db.scalars(select(ModelRecord)).first() is None


# ------------------------------------------------------------------------------------------------ against vLLM


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM's environment is absent ({VLLM_PYTHON})")
def test_the_rules_agree_with_a_vllm_server(tmp_path: Path) -> None:
    """One vLLM 0.32 server (float32, --max-lora-rank 8) on a tiny Llama that its CPU kernels run: each adapter
    loads exactly when the gate passes it."""
    from inference.vllm.pool import options_from
    from inference.vllm.server import VllmServer, VllmUnavailable
    from tests.inference.test_vllm import build_vllm_model

    base = build_vllm_model(tmp_path / "tiny-vllm")
    settings = _settings(
        base_models={"tiny-vllm": str(base)},
        vllm_python=VLLM_PYTHON,
        vllm_dtype="float32",
        vllm_max_model_len=512,
        vllm_cpu_kvcache_gib=1,
        vllm_start_timeout_seconds=300,
    )
    cases = {
        "plain": save_adapter(base, tmp_path / "plain"),
        "embedding": save_adapter(base, tmp_path / "embedding", target_modules=["q_proj", "embed_tokens"]),
        "rank16": save_adapter(base, tmp_path / "rank16", r=16),
        "saved-head": save_adapter(base, tmp_path / "saved-head", modules_to_save=["lm_head"]),
        "dora": save_adapter(base, tmp_path / "dora", use_dora=True),
        "resized": save_adapter(base, tmp_path / "resized", resize=8, target_modules=["q_proj", "embed_tokens"]),
        "resized-saved": save_adapter(base, tmp_path / "resized-saved", resize=8, save_embedding_layers=True),
    }
    expected = {"plain": None, "embedding": None, "rank16": "lora_rank", "saved-head": "modules_to_save"}
    expected |= {"dora": "use_dora", "resized": "vocab_size", "resized-saved": "vocab_size"}
    assert {name: _problem(path, "tiny-vllm", settings)[0] for name, path in cases.items()} == expected

    server = VllmServer("tiny-vllm", base, options_from(settings, threads=1)).start()
    try:
        assert server.wait_healthy(300), server.problem
        refusals: dict[str, str | None] = {}
        for name, path in cases.items():
            try:
                server.load_adapter(name, path)
                refusals[name] = None
            except VllmUnavailable as exc:
                refusals[name] = str(exc)
    finally:
        server.stop()
    assert {name: why is None for name, why in refusals.items()} == {name: f is None for name, f in expected.items()}
    # ... and for the reason the gate gives (vLLM's own words).
    reasons = {
        "rank16": "greater than max_lora_rank",
        "saved-head": "modules_to_save",
        "dora": "DoRA",
        "resized": "vocabulary size",
        "resized-saved": "unsupported LoRA weight",
    }
    for name, words in reasons.items():
        assert words in (refusals[name] or ""), (name, refusals[name])
