"""Base models come from configuration only (``BASE_MODELS``): an id maps to a local folder, or to the
``builtin:smollm2`` GGUF that the worker converts once into the model store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def base_model_config(name: str, settings: Settings) -> dict[str, Any] | None:
    """The configured base model's config.json, or None when it is not prepared yet or unreadable (the api then
    falls back to what it knows of the builtin model)."""
    try:
        config = json.loads((base_model_path(name, settings) / "config.json").read_text(encoding="utf-8"))
    except (KeyError, OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_prepared(name: str, settings: Settings) -> bool:
    folder = base_model_path(name, settings)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
