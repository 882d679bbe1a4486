"""The llama.cpp backend on tiny real models: the GGUF export reproduces the model, quantised types stay close,
exports are cached and refreshed, sequences are handed back, the context limit ends an answer cleanly, and the
service serves with it. Engine behaviour shared with the other backends (same greedy tokens as ``generate``,
batching, chunked prefill) is covered in test_engine.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from artifacts.gguf import _interleave_rotary
from inference.engine.engine import Engine, Finished, GenerationRequest
from inference.engine.llamacpp import LlamaCppDecoder
from inference.engine.loader import LoadedModel, ModelLoadError, load_model
from inference.engine.sampling import SamplingParams
from tests.inference.helpers import app_client
from tests.inference.test_engine import CollectSink, _submit, llamacpp_options
from tests.polling import wait_until
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.native

PROMPTS = ("Tell me about tides.", "What is the weather like today, and should I take an umbrella?")


def _logits_of(model: LoadedModel, prompts: tuple[str, ...]) -> list[torch.Tensor]:
    """Last-position logits of each prompt, then of one more (greedy) token, as a decoder sees them."""
    out = []
    for prompt in prompts:
        ids = model.encode_chat([{"role": "user", "content": prompt}])
        cache = model.decoder.new_cache(1, len(ids) + 2)
        first = model.decoder.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), cache)
        step = torch.tensor([[int(first[0].argmax())]])
        second = model.decoder.forward(step, torch.ones(1, 1, dtype=torch.bool), cache)
        cache.release()
        out += [first[0], second[0]]
    return out


def _load(folder: Path, cache_dir: Path, quant: str = "none", **options: int) -> LoadedModel:
    return load_model(
        "tiny", folder, backend_setting="llamacpp", quant_setting=quant, llamacpp=llamacpp_options(cache_dir, **options)
    )


def _close(model: LoadedModel) -> None:
    assert isinstance(model.decoder, LlamaCppDecoder)
    model.decoder.close()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_the_exported_model_computes_what_transformers_computes(
    tiny_models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    reference = _logits_of(load_model(name, tiny_models[name], backend_setting="reference"), PROMPTS)
    exported = _load(tiny_models[name], tmp_path)
    assert exported.backend == "llamacpp" and exported.quant == "f32"
    # A wrong tensor name, a missed q/k reordering or a lost bias would move these far more than rounding does.
    for ours, theirs in zip(_logits_of(exported, PROMPTS), reference, strict=True):
        assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    _close(exported)


@pytest.mark.parametrize(
    ("quant", "file_type", "floor"), [("bf16", "bf16", 0.999), ("int8", "q8_0", 0.999), ("int4", "q4_1", 0.99)]
)
def test_quantised_types_stay_close_to_the_full_precision_model(
    tiny_models: dict[str, Path], tmp_path: Path, quant: str, file_type: str, floor: float
) -> None:
    dense = _load(tiny_models["tiny-llama"], tmp_path)
    quantised = _load(tiny_models["tiny-llama"], tmp_path, quant)
    assert quantised.quant == file_type
    assert quantised.weight_bytes < dense.weight_bytes * 0.6
    for ours, theirs in zip(_logits_of(quantised, PROMPTS), _logits_of(dense, PROMPTS), strict=True):
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > floor
    _close(dense)
    _close(quantised)


def test_rotary_rows_are_interleaved_per_head() -> None:
    # Two heads of four rows: rotate-half order (x0 x1 | y0 y1) becomes pairs (x0 y0 x1 y1) in each head.
    weight = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3).numpy()
    reordered = _interleave_rotary(weight, heads=2)
    assert reordered[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_an_export_is_reused_until_the_model_files_change(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "model", "llama", seed=5)
    cache_dir = tmp_path / "gguf"
    first = _load(folder, cache_dir, "int4")
    (exported,) = cache_dir.glob("*.gguf")
    written = exported.stat().st_mtime_ns
    _close(first)
    again = _load(folder, cache_dir, "int4")
    assert list(cache_dir.glob("*.gguf")) == [exported] and exported.stat().st_mtime_ns == written
    _close(again)
    assert not list(cache_dir.glob(".export-*")), "no scratch folder is left behind"
    # New weights in the same folder (a re-published model): a new export, with the new weights' answers.
    build_tiny_model(folder, "llama", seed=6)
    os.utime(folder / "model.safetensors", ns=(written + 10**9, written + 10**9))
    changed = _load(folder, cache_dir, "int4")
    assert len(list(cache_dir.glob("*.gguf"))) == 2
    reference = _logits_of(load_model("tiny", folder), PROMPTS[:1])
    ours = _logits_of(changed, PROMPTS[:1])
    assert torch.nn.functional.cosine_similarity(ours[0], reference[0], dim=0) > 0.99
    _close(changed)


def test_rows_hand_their_sequences_back_whatever_ends_them(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = _load(tiny_models["tiny-llama"], tmp_path, max_sequences=2)
    engine = Engine(model, max_batch_size=2).start()
    try:
        ids = model.encode_chat([{"role": "user", "content": PROMPTS[0]}])
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        first = _submit(engine, ids, params).wait().text
        # Three times as many requests as sequences, some cancelled mid-answer: each must find a free sequence
        # whose cache holds nothing of an earlier request, or its greedy answer would change.
        for _ in range(3):
            sinks = [_submit(engine, ids, params) for _ in range(2)]
            cancelled = CollectSink()
            request = GenerationRequest(ids, SamplingParams(max_new_tokens=500, ignore_eos=True), cancelled)
            engine.submit(request)
            assert all(s.wait().text == first for s in sinks)
            assert cancelled.first.wait(30)
            request.cancel()
            assert isinstance(cancelled.wait().last, Finished)
        assert _submit(engine, ids, params).wait().text == first
        assert isinstance(model.decoder, LlamaCppDecoder)
        decoder = model.decoder
        # The last Finished event goes out just before its row's sequence is handed back.
        wait_until(lambda: decoder.free_sequences == 2, timeout=10, what="both sequences free")
    finally:
        engine.stop()


def test_an_answer_reaching_the_context_limit_ends_at_length(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = _load(tiny_models["tiny-llama"], tmp_path, context=64)
    assert model.max_positions <= 256  # llama.cpp rounds a context up to whole blocks
    engine = Engine(model, max_batch_size=8).start()
    try:
        ids = model.encode_chat([{"role": "user", "content": PROMPTS[0]}])
        long = _submit(engine, ids, SamplingParams(max_new_tokens=5000, ignore_eos=True)).wait()
        assert isinstance(long.last, Finished) and long.last.reason == "length"
        assert long.last.prompt_tokens + long.last.completion_tokens == model.max_positions
        short = _submit(engine, ids, SamplingParams(max_new_tokens=3, ignore_eos=True)).wait()
        assert isinstance(short.last, Finished) and short.last.completion_tokens == 3
        assert engine.healthy
    finally:
        engine.stop()


def test_models_the_backend_cannot_run_are_refused_with_a_reason(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="INFERENCE_QUANT with INFERENCE_BACKEND=llamacpp must be one of"):
        _load(tiny_models["tiny-llama"], tmp_path, "int3")
    odd = tmp_path / "gelu"
    shutil.copytree(tiny_models["tiny-llama"], odd)
    config = (odd / "config.json").read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"')
    (odd / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=r"llama\.cpp backend cannot run this model: activation 'gelu'"):
        _load(odd, tmp_path)
    with pytest.raises(ModelLoadError, match="needs its options"):
        load_model("tiny", tiny_models["tiny-llama"], backend_setting="llamacpp")
    with pytest.raises(ModelLoadError, match="INFERENCE_BACKEND must be one of"):
        load_model("tiny", tiny_models["tiny-llama"], backend_setting="llama.cpp")


@pytest.mark.usefixtures("clean_db")
def test_the_service_serves_with_the_llamacpp_backend(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with app_client(inference_backend="llamacpp", inference_quant="int4", gguf_cache=tmp_path / "gguf") as client:
        (model,) = client.get("/readyz").json()["models"]
        assert (model["backend"], model["quant"]) == ("llamacpp", "q4_1")
        answer = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 5, "ignore_eos": True})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 5
        streamed = client.post(
            "/v1/chat/completions",
            json={"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert streamed.status_code == 200, streamed.text
        assert streamed.json()["usage"]["completion_tokens"] >= 1
    assert list((tmp_path / "gguf").glob("*.q4_1.gguf"))


@pytest.mark.parametrize("variant", ["untied", "bf16"])
def test_checkpoints_with_their_own_head_or_in_bf16_export_as_well(
    tiny_models: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    from transformers import AutoModelForCausalLM

    folder = tmp_path / variant
    shutil.copytree(tiny_models["tiny-qwen2"], folder)  # Qwen2: q/k/v biases too
    model = AutoModelForCausalLM.from_pretrained(folder)
    if variant == "untied":
        model.config.tie_word_embeddings = False
        torch.manual_seed(3)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    else:
        model = model.to(torch.bfloat16)  # what a GPU merge publishes
    model.save_pretrained(folder)
    reference = load_model("ref", folder, backend_setting="reference")
    exported = _load(folder, tmp_path / "gguf")
    for ours, theirs in zip(_logits_of(exported, PROMPTS), _logits_of(reference, PROMPTS), strict=True):
        assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    _close(exported)


def test_a_checkpoint_missing_a_weight_is_refused_by_name(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_models["tiny-llama"], folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks weights the model needs: blk\.1\.ffn_down\.weight"):
        _load(folder, tmp_path / "gguf")
    assert not list((tmp_path / "gguf").glob("*.gguf"))
