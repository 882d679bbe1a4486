"""Base models come from configuration only (``BASE_MODELS``): an id maps to a local folder, or to the
``builtin:smollm2`` GGUF that the worker converts once into the model store."""

from __future__ import annotations

from pathlib import Path

from core.settings import BUILTIN_SMOLLM2, Settings
from core.storage import base_models_dir


def base_model_spec(name: str, settings: Settings) -> str | None:
    return settings.base_models.get(name)


def base_model_path(name: str, settings: Settings) -> Path:
    """Where the base model's safetensors folder is (or will be, once prepared). KeyError if not configured."""
    spec = settings.base_models[name]
    if spec == BUILTIN_SMOLLM2:
        return base_models_dir(settings) / name
    return Path(spec).expanduser().resolve()


def is_prepared(name: str, settings: Settings) -> bool:
    folder = base_model_path(name, settings)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
