"""The serving files of a model the worker publishes or prepares (``artifacts.serving``): reference answers to
the golden prompts and the llama.cpp export of the default CPU route, written while the model is in memory, so
inference loads a published model in about a second and never exports on a request's time. And the
serve-compatibility gate at publish: an adapter the serving engine would refuse fails the job before it is
merged or published."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from artifacts import llamacpp
from artifacts.golden import ReferenceError
from artifacts.serving import ServingFiles, export_types, write_serving_files
from core import servability
from core.base_models import base_model_config, base_model_path
from core.settings import Settings
from core.templates import Message
from worker.pipeline.checkpoints import ADAPTER_FILE
from worker.pipeline.errors import PipelineError
from worker.pipeline.merge import Merged


def write_model_serving_files(
    folder: Path,
    merged: Merged,
    template: str,
    validation: Sequence[Sequence[Message]] | None,
    settings: Settings,
) -> ServingFiles:
    """Raises PipelineError when the model's own answers are unusable (it must not be published) or
    ``SERVING_EXPORTS`` is invalid."""
    available = llamacpp.available()
    try:
        types = export_types(settings.serving_exports, available)
    except ValueError as exc:
        raise PipelineError("invalid_configuration", str(exc), None) from exc
    try:
        return write_serving_files(
            folder,
            model=merged.model,
            tokenizer=merged.tokenizer,
            template=template,
            stop_ids=merged.stop_ids,
            validation=validation,
            file_types=types,
            # Every core: a one-off burst between training and publishing.
            quantize=(lambda src, dst, kind: llamacpp.quantize(src, dst, kind, threads=0)) if available else None,
        )
    except ReferenceError as exc:
        raise PipelineError("model_unusable", f"the fine-tuned model fails its reference check: {exc}") from exc


def check_adapter_servable(
    adapter_dir: Path,
    base_model: str,
    settings: Settings,
    serving: servability.AdapterServing | None,
    *,
    continued: bool = False,
) -> None:
    """Apply the serve-compatibility rules (``core.servability``, the api's at creation) to the adapter as saved:
    its adapter_config.json and its weights' names and shapes, against the base model as this worker has it
    (``continued``: the job trained on a fine-tune of it).
    Raises PipelineError ``not_servable`` naming the field, before anything is merged or published. ``serving``
    (``servability.adapter_serving``: this worker's INFERENCE_BACKEND and VLLM_MAX_LORA_RANK, and the live
    inference replicas that serve adapters) decides; None: the merged weights are served and nothing is refused."""
    if serving is None:
        return
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        shapes = tensor_shapes(adapter_dir / ADAPTER_FILE)
    except (OSError, ValueError) as exc:
        raise PipelineError("not_servable", f"the saved adapter cannot be read: {exc}") from exc
    base_folder = base_model_path(base_model, settings).resolve()
    base_config = base_model_config(base_model, settings) or {}
    vocab = base_config.get("vocab_size")
    base = servability.BaseModel(
        base_model,
        base_config.get("model_type") if isinstance(base_config.get("model_type"), str) else None,
        vocab_size=vocab if isinstance(vocab, int) else None,
        # A job that continued a fine-tune trained on that model's weights: inference serves its merged folder on
        # a server of its own (inference/vllm/pool.py), so only a job on the base must name the base's folder.
        folder=None if continued else str(base_folder),
    )
    problem = servability.check(serving, base, describe_adapter(config, shapes))
    if problem is not None:
        raise PipelineError("not_servable", f"{problem.field}: {problem.message}", problem.field)


def describe_adapter(config: dict[str, Any], shapes: dict[str, list[int]]) -> servability.Adapter:
    """The adapter as the serving engine sees it: the modules its tensors adapt (the weights, not the config's
    target_modules, are what vLLM checks), whole weights saved beside them, and embedding LoRAs' vocabulary."""
    modules: list[str] = []
    full: dict[str, int] = {}
    embeddings: dict[str, int] = {}
    for name, shape in shapes.items():
        path = name.removeprefix("base_model.model.")
        parts = path.split(".")
        if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            modules.append(".".join(parts[:-2]))
        elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            module = ".".join(parts[:-1])
            modules.append(module)
            if parts[-1] == "lora_embedding_A" and len(shape) == 2:
                embeddings[module] = shape[1]  # [rank, vocabulary]
        elif not name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            full[".".join(parts[:-1]) or name] = shape[0] if shape else 0  # vLLM skips base-layer copies only
    named = config.get("base_model_name_or_path")
    rank_pattern = config.get("rank_pattern") or {}
    return servability.Adapter(
        rank=int(config.get("r", 0)),
        target_modules=tuple(dict.fromkeys(modules)),
        rank_pattern={k: v for k, v in rank_pattern.items() if isinstance(v, int)},
        modules_to_save=tuple(config.get("modules_to_save") or ()),
        unsupported_features=servability.unsupported_features(config),
        full_weights=full,
        embedding_vocab_sizes=embeddings,
        base_folder=str(Path(named).expanduser().resolve()) if isinstance(named, str) and named else None,
    )


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header (8 bytes of length, then JSON): no weights read."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path.name} is not a safetensors file")
        header = json.loads(file.read(length))
    return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
