"""The serving files of a model the worker publishes or prepares (``artifacts.serving``): reference answers to
the golden prompts and the llama.cpp export of the default CPU route, written while the model is in memory, so
inference loads a published model in about a second and never exports on a request's time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from artifacts import llamacpp
from artifacts.golden import ReferenceError
from artifacts.serving import ServingFiles, export_types, write_serving_files
from core.settings import Settings
from core.templates import Message
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
