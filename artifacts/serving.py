"""The serving files of a model folder: what inference loads besides the weights, written where the model is
already in memory (the worker at publish, base-model preparation), so a published model answers within a
second or two of its announcement instead of paying for an export on its first request.

``<model folder>/serving/`` holds:
- ``<type>.gguf``: the llama.cpp export of the weights in each type asked for (the default CPU route's);
- ``reference.json``: the golden prompts' reference answers (``artifacts.golden``), which the fidelity gate holds
  every route to before the model becomes active;
- ``manifest.json``: the files above and the identity (name, size, mtime) of the weights they were made from.
  Files whose identity no longer matches the weights are ignored, never served.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.gguf import EXPORT_VERSION, export_gguf
from artifacts.golden import Reference, compute_reference, golden_conversations
from core.templates import Message

log = logging.getLogger("conch.artifacts.serving")

SERVING_DIR = "serving"
MANIFEST = "manifest.json"
REFERENCE_FILE = "reference.json"
SERVING_VERSION = 1
# The default CPU route's type (inference.engine.routes). Measured on the default model, 2-vCPU AMD EPYC, 2 threads
# (python -m bench.fidelity_bench): f16 kept 100% next-token agreement with the fp32 reference and every greedy
# answer, decoding 82-86 tokens/s; bf16 decoded at the same speed but changed 3 of 6 answers (99.48% agreement);
# f32 decoded about 30; Q8_0 and Q4_1 fell below the 99% gate (95.8% and 96.9%).
DEFAULT_CPU_TYPE = "f16"


def weights_stamp(folder: Path) -> list[list[Any]]:
    """Identity of the files a model is built from (weights and configs at the top of the folder)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@dataclass
class ServingFiles:
    folder: Path
    gguf: dict[str, Path] = field(default_factory=dict)  # file type -> path
    reference: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def load_reference(self) -> Reference | None:
        return Reference.load(self.reference) if self.reference else None


def read_serving_files(folder: Path) -> ServingFiles | None:
    """The folder's serving files, or None if there are none or they were made from other weights."""
    root = folder / SERVING_DIR
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("version") != SERVING_VERSION
        or manifest.get("export_version") != EXPORT_VERSION
        or manifest.get("weights") != weights_stamp(folder)
    ):
        return None
    files = ServingFiles(folder=folder)
    for file_type, name in (manifest.get("gguf") or {}).items():
        if (root / name).is_file():
            files.gguf[str(file_type)] = root / name
    reference = manifest.get("reference")
    if reference and (root / reference).is_file():
        files.reference = root / reference
    return files


def write_serving_files(
    folder: Path,
    *,
    model: Any,
    tokenizer: Any,
    template: str,
    stop_ids: Sequence[int],
    validation: Sequence[Sequence[Message]] | None,
    file_types: Sequence[str],
    quantize: Callable[[Path, Path, str], None] | None,
) -> ServingFiles:
    """Write ``folder/serving/`` for the model saved in ``folder`` and still held in memory as ``model``.

    The reference is computed first (it converts ``model`` to fp32 in place: call this after saving the
    weights); ReferenceError from it means the model must not be published. GGUF exports need llama.cpp's
    quantiser (``quantize``); without it only the reference is written and inference exports on first load."""
    root = folder / SERVING_DIR
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    conversations, source = golden_conversations(validation)
    reference = compute_reference(model, tokenizer, template, conversations, prompts=source, stop_ids=stop_ids)
    reference.save(root / REFERENCE_FILE)
    seconds["reference"] = round(time.perf_counter() - started, 3)
    written: dict[str, str] = {}
    if quantize is not None:
        for file_type in file_types:
            started = time.perf_counter()
            name = f"{file_type}.gguf"
            export_gguf(folder, model.config, root / name, file_type, quantize)
            written[file_type] = name
            seconds[f"gguf_{file_type}"] = round(time.perf_counter() - started, 3)
    manifest = {
        "version": SERVING_VERSION,
        "export_version": EXPORT_VERSION,
        "weights": weights_stamp(folder),
        "gguf": written,
        "reference": REFERENCE_FILE,
        "golden_prompts": source,
        "seconds": seconds,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("serving_files.written", extra={"folder": str(folder), "gguf": sorted(written), "seconds": seconds})
    return ServingFiles(
        folder=folder,
        gguf={t: root / n for t, n in written.items()},
        reference=root / REFERENCE_FILE,
        seconds=seconds,
    )


def export_types(setting: str, llamacpp_available: bool) -> list[str]:
    """The GGUF types to write next to a published model (``SERVING_EXPORTS``): ``auto`` is the default CPU
    route's, ``none`` writes none; llama.cpp's quantiser is needed for any. Raises ValueError on an unknown
    type."""
    from artifacts.llamacpp import GGUF_TYPES

    value = (setting or "auto").strip().lower()
    if value == "none" or not llamacpp_available:
        return []
    if value == "auto":
        return [DEFAULT_CPU_TYPE]
    types = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise ValueError(f"SERVING_EXPORTS names unknown GGUF types {unknown}; choose from {', '.join(GGUF_TYPES)}")
    return types
