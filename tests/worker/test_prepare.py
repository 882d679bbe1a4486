"""Base model preparation: configured folders are checked, the built-in GGUF is converted once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.settings import BUILTIN_SMOLLM2, get_settings
from worker.pipeline.prepare import BaseModelError, prepare_base_model


def test_a_configured_folder_is_used_as_it_is(tiny_models: dict[str, Path]) -> None:
    assert prepare_base_model("tiny-llama", get_settings()) == tiny_models["tiny-llama"]


def test_unknown_and_empty_base_models_are_refused(tmp_path: Path) -> None:
    settings = get_settings().model_copy(update={"base_models": {"empty": str(tmp_path)}})
    with pytest.raises(BaseModelError, match="not configured"):
        prepare_base_model("nope", settings)
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        prepare_base_model("empty", settings)


@pytest.mark.slow
def test_the_builtin_model_is_converted_once_into_a_safetensors_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = get_settings().model_copy(
        update={"model_store": tmp_path / "store", "base_models": {"smol": BUILTIN_SMOLLM2}}
    )
    folder = prepare_base_model("smol", settings, progress=False)
    assert folder == tmp_path / "store" / "smol"
    weights = folder / "model.safetensors"
    assert weights.is_file() and weights.stat().st_mode & 0o044 == 0o044  # readable by the other services
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.eos_token == "<|im_end|>" and generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id and tokenizer.chat_template
    assert not list(folder.parent.glob(".*.tmp-*"))

    stamp = weights.stat().st_mtime_ns
    assert prepare_base_model("smol", settings, progress=False) == folder
    assert weights.stat().st_mtime_ns == stamp  # prepared once, then reused

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
