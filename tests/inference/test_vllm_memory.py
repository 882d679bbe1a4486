"""INFERENCE_BACKEND=vllm in the memory budget, without a vLLM server: where each model runs (``serve_as`` honoured)
and what MODEL_MEMORY_BUDGET_BYTES counts for it. A model that owns a vLLM server (a base model, a fine-tune served
merged) counts the server's KV cache (VLLM_CPU_KVCACHE_GIB) beside its weights; an adapter counts its own size."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from core.settings import Settings
from inference.catalog import ModelSource, base_source
from inference.engine.loader import load_model
from inference.errors import ModelDoesNotFit
from inference.metrics import Metrics
from inference.registry import Registry
from inference.vllm.pool import Placement, account, options_from, placement_for

GIB = 1024**3


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """As the worker publishes a fine-tune of tiny-llama: merged weights (here the base's) and its adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("vllm-memory") / "ft"
    shutil.copytree(tiny_models["tiny-llama"], folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"])
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder / "adapter"))
    return folder


def _settings() -> Settings:
    return Settings(inference_backend="vllm", vllm_cpu_kvcache_gib=3)


def _source(folder: Path, serve_as: str) -> ModelSource:
    return ModelSource(
        name="ft:tiny-llama:mem:ftjob-m",
        folder=folder,
        template="auto",
        owner="default",
        base_model="tiny-llama",
        created=0,
        serve_as=serve_as,
    )


def test_the_placement_follows_serve_as(finetune: Path, tiny_models: dict[str, Path]) -> None:
    settings = _settings()
    adapter = placement_for(_source(finetune, "adapter"), settings)
    assert adapter.server_name == "tiny-llama" and adapter.adapter == finetune / "adapter"
    merged = placement_for(_source(finetune, "merged"), settings)
    assert merged == Placement("ft:tiny-llama:mem:ftjob-m", finetune, None)  # its own server, its merged folder
    base = base_source("tiny-llama", settings)
    assert placement_for(replace(base, serve_as="adapter"), settings).adapter is None  # a base is its own weights


def test_the_budget_counts_the_kv_cache_of_a_model_that_owns_a_vllm_server(finetune: Path) -> None:
    settings = _settings()
    options = options_from(settings, threads=1)
    weights = sum(path.stat().st_size for path in finetune.glob("*.safetensors"))
    adapter_bytes = sum(path.stat().st_size for path in (finetune / "adapter").glob("*.safetensors"))
    sizes = {}
    for serve_as in ("adapter", "merged"):
        source = _source(finetune, serve_as)
        model = load_model(source.name, finetune, device_setting="cpu", backend_setting="vllm")
        account(model, placement_for(source, settings), options)
        sizes[serve_as] = (model.size_bytes, model.cache_bytes)
    # What the registry adds up against MODEL_MEMORY_BUDGET_BYTES (``LoadedModel.size_bytes``).
    assert sizes["merged"] == (weights + 3 * GIB, 3 * GIB)
    assert sizes["adapter"] == (adapter_bytes, 0)  # the base's server, weights and cache, is counted by the base


def test_an_on_demand_adapter_is_admitted_at_its_own_size(finetune: Path) -> None:
    """Before a load the registry makes room for the model's estimated size: on vLLM the size the placement will
    cost (an adapter's own bytes on its base's server), not a whole model with a cache of its own. A budget that
    holds the adapter but not a merged model with its server's KV cache admits the one and refuses the other."""
    adapter_bytes = sum(path.stat().st_size for path in (finetune / "adapter").glob("*.safetensors"))
    weights = sum(path.stat().st_size for path in finetune.glob("*.safetensors"))
    settings = _settings().model_copy(update={"model_memory_budget_bytes": adapter_bytes + 1024})
    registry = Registry(settings, Metrics())
    try:
        assert registry.vllm is not None and not registry.vllm.servers()
        assert registry.vllm.estimate_bytes(_source(finetune, "adapter")) == adapter_bytes
        assert registry.vllm.estimate_bytes(_source(finetune, "merged")) == weights + 3 * GIB
        registry._make_room(_source(finetune, "adapter"))  # admitted: no error
        with pytest.raises(ModelDoesNotFit):
            registry._make_room(_source(finetune, "merged"))
        assert not registry.vllm.servers()  # nothing was started to find out
    finally:
        registry.close()
