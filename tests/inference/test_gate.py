"""The fidelity gate on tiny real models: the default route is measured against the fp32 reference and kept; a
route that really changes answers (a deliberately broken export, a too-coarse type) is refused for the next
one, and the deployment says so; a model whose reference is broken is never activated; the figures land on the
deployment, the api's views of it, /readyz and the metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import artifacts.gguf
from artifacts.golden import BUILTIN_PROMPTS
from artifacts.serving import DEFAULT_CPU_TYPE
from core.orm import Deployment, ModelRecord
from inference.engine.routes import FAITHFUL, Route, plan_routes
from tests.factories import make_model
from tests.inference.helpers import ACTIVE, FAILED, app_client, deploy, metric, wait_deployment
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("clean_db", "tiny_models")

FT = "ft:tiny-llama:gate:ftjob-0001"
DEFAULT_ROUTE = f"llamacpp:{DEFAULT_CPU_TYPE}"


def _plan(backend: str = "auto", quant: str = "none", device: str = "cpu", llamacpp: bool = True) -> list[Route]:
    return plan_routes(
        backend=backend, quant=quant, dtype="auto", device=torch.device(device), llamacpp_available=llamacpp
    )


def test_routes_are_planned_per_device() -> None:
    assert [r.name for r in _plan()] == ["llamacpp:f16", "llamacpp:f32", FAITHFUL.name]
    assert _plan(llamacpp=False) == [FAITHFUL]  # a CPU without llama.cpp installed
    assert _plan(device="cuda")[0] == Route("lean")
    # An explicit choice goes first, the faithful route still behind it.
    assert _plan("llamacpp", "q4_0") == [Route("llamacpp", "q4_0"), FAITHFUL]


def test_the_default_route_passes_the_gate_and_the_figures_land_everywhere(db, finetuned) -> None:  # type: ignore[no-untyped-def]
    from api.services.models import deployment_out, get_model
    from core.settings import Settings

    make_model(db, FT, storage_path=finetuned)
    db.commit()
    with app_client() as client:
        row = wait_deployment(db, deploy(db, FT), ACTIVE, FAILED)
        assert row.status == ACTIVE, row.reason
        assert row.route == DEFAULT_ROUTE
        fidelity = row.fidelity
        assert fidelity is not None and fidelity["passed"] and fidelity["agreement"] >= fidelity["threshold"] == 0.99
        assert (
            fidelity["positions"] > 0
            and fidelity["prompts"] == len(BUILTIN_PROMPTS)
            and fidelity["fell_back_from"] == []
        )
        # The api shows the same figures on the deployment and on the model.
        out = deployment_out(row)
        assert out.route == DEFAULT_ROUTE and out.fidelity == fidelity
        model = get_model(db, "default", FT, Settings())
        assert model.conch["serving"] == {"route": DEFAULT_ROUTE, "fidelity": fidelity}
        ready = client.get("/readyz").json()
        served = {m["id"]: m for m in ready["models"]}
        assert served[FT]["route"] == DEFAULT_ROUTE and served[FT]["fidelity"]["agreement"] == fidelity["agreement"]
        text = client.get("/metrics").text
        assert metric(text, "conch_inference_fidelity_agreement", model=FT, route=DEFAULT_ROUTE) == pytest.approx(
            fidelity["agreement"], abs=1e-4
        )


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose answers depend on what it reads (the default-initialised ones answer one token to
    everything, so no rounding could ever change their answers): measured, llama.cpp f32 agrees with its fp32
    reference on 100% of the golden positions, Q4_0 on about a third."""
    return build_tiny_model(tmp_path_factory.mktemp("sensitive") / "model", "llama", seed=11, initializer_range=0.3)


def _deployed(db, folder: Path, **settings: object) -> tuple[object, dict]:  # type: ignore[no-untyped-def,type-arg]
    make_model(db, FT, storage_path=folder)
    db.commit()
    with app_client(**settings) as client:
        row = wait_deployment(db, deploy(db, FT), ACTIVE, FAILED)
        assert row.status == ACTIVE, row.reason
        response = client.get("/generate", params={"model": FT, "prompt": "Hello", "max_new_tokens": 3})
        assert response.status_code == 200
        return row, row.fidelity


def test_a_broken_export_is_refused_and_the_faithful_route_serves(db, sensitive: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The llama.cpp f32 route passes on this model...
    row, fidelity = _deployed(db, sensitive, inference_backend="llamacpp")
    assert row.route == "llamacpp:f32" and fidelity["agreement"] >= 0.99 and fidelity["fell_back_from"] == []
    # ... until the export "forgets" the rotary reordering of q/k rows (a real bug class): llama.cpp then computes
    # another model, the gate refuses it, and the faithful route serves.
    monkeypatch.setattr(artifacts.gguf, "INTERLEAVED_ROPE", frozenset())
    broken = build_tiny_model(sensitive.parent / "broken-export", "llama", seed=11, initializer_range=0.3)
    db.query(Deployment).delete()
    db.query(ModelRecord).delete()
    db.commit()
    row, fidelity = _deployed(db, broken, inference_backend="llamacpp")
    assert row.route == FAITHFUL.name and fidelity["agreement"] >= 0.99
    (rejected,) = fidelity["fell_back_from"]
    assert rejected["route"] == "llamacpp:f32" and rejected["agreement"] < 0.5 and "agreement" in rejected["reason"]


def test_a_too_coarse_type_is_refused(db, sensitive: Path) -> None:  # type: ignore[no-untyped-def]
    row, fidelity = _deployed(db, sensitive, inference_backend="llamacpp", inference_quant="q4_0")
    assert row.route == FAITHFUL.name
    (rejected,) = fidelity["fell_back_from"]
    assert rejected["route"] == "llamacpp:q4_0" and rejected["agreement"] < 0.99


def test_a_model_whose_reference_is_broken_is_never_activated(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    folder = build_tiny_model(tmp_path / "nan", "llama", seed=12)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    make_model(db, FT, storage_path=folder)
    db.commit()
    with app_client() as client:
        row = wait_deployment(db, deploy(db, FT), ACTIVE, FAILED)
        assert row.status == FAILED
        assert "reference" in (row.reason or "") and "non-finite" in (row.reason or "")
        assert row.route is None
        assert client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 2}).json()["model"] == "tiny-llama"


@pytest.mark.parametrize("backend", ["llamacpp", "lean"])
def test_the_one_pass_scoring_equals_the_engine_s_own_step_by_step_decoding(
    tiny_models: dict[str, Path], tmp_path: Path, backend: str
) -> None:
    # The gate's fast path (every position of a golden answer in one pass) must see what the engine's decoding
    # sees token by token, or the gate would judge another computation than the one that serves.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from artifacts.golden import compute_reference, golden_conversations
    from inference.engine.loader import load_model
    from inference.gate import _stepwise_logits, route_logits
    from tests.inference.test_engine import llamacpp_options

    folder = tiny_models["tiny-qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    conversations, source = golden_conversations(None)
    reference = compute_reference(
        AutoModelForCausalLM.from_pretrained(folder),
        tokenizer,
        "auto",
        conversations,
        prompts=source,
        stop_ids=[tokenizer.eos_token_id],
    )
    native = llamacpp_options(tmp_path) if backend == "llamacpp" else None
    model = load_model(
        "tiny", folder, backend_setting=backend, quant_setting="f32" if native else "none", llamacpp=native
    )
    for fast, slow in zip(route_logits(model, reference), _stepwise_logits(model, reference), strict=True):
        assert fast.shape == slow.shape
        assert np.allclose(fast, slow, atol=1e-3), float(np.abs(fast - slow).max())
    close = getattr(model.decoder, "close", None)
    if close:
        close()
