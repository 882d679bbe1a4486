"""Check ``lora_target`` against the base model's architecture when a job is created, not minutes later in peft.

The api never imports torch, so the module names come from a table per architecture (``model_type`` in the base
model's ``config.json``), not from instantiating the model. A name is accepted the way peft matches it: it must
equal a layer's module path or end it after a dot (``q_proj``, ``self_attn.q_proj``,
``model.layers.0.self_attn.q_proj``). Only the decoder layers' linear projections are offered, the same modules
``all`` adapts: LoRA on the embeddings or the output head (tied to the embeddings in small models) is not a
shape the merge and export steps are built for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.base_models import base_model_config
from core.settings import BUILTIN_SMOLLM2, Settings

ALL = "all"
MAX_NAMES = 64
MAX_NAME_CHARS = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")

# Decoder-layer linear modules, as (sub-block, module) under ``model.layers.<i>``.
_LLAMA_LAYOUT = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)
_PHI3_LAYOUT = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    **{
        name: _LLAMA_LAYOUT
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2")
    },
    "phi3": _PHI3_LAYOUT,
}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int | None  # None: any layer index is accepted


# A builtin base model is converted into the model store by the worker on first use; until then its config.json
# does not exist, so its architecture is known here (SmolLM2-135M: Llama, 30 layers).
BUILTIN_ARCHITECTURES = {BUILTIN_SMOLLM2: Architecture("llama", 30)}


def split_names(target: str | list[str]) -> list[str]:
    """The module names, as the worker reads them: a list, or one comma-separated string."""
    raw = target.split(",") if isinstance(target, str) else target
    return [name.strip() for name in raw if name.strip()]


def syntax_error(target: str | list[str]) -> str | None:
    """Why ``target`` cannot name modules of any model, or None."""
    names = split_names(target)
    if not names:
        return "name at least one module, or 'all'"
    if len(names) > MAX_NAMES:
        return f"at most {MAX_NAMES} module names"
    if ALL in names and names != [ALL]:
        return "'all' already names every layer's linear modules; send it alone"
    for name in names:
        if len(name) > MAX_NAME_CHARS or not _NAME_RE.match(name):
            return f"'{name[:MAX_NAME_CHARS]}' is not a module name (letters, digits and '_', joined by dots)"
    return None


def architecture(model: str, settings: Settings) -> Architecture | None:
    """The base model's architecture from its config.json (or the builtin table); None when unknown."""
    spec = settings.base_models.get(model)
    if spec is None:
        return None
    config = base_model_config(model, settings)
    if config is None or not isinstance(config.get("model_type"), str):
        return BUILTIN_ARCHITECTURES.get(spec)
    layers = config.get("num_hidden_layers")
    return Architecture(config["model_type"], layers if isinstance(layers, int) and layers > 0 else None)


def _matches(name: str, arch: Architecture, layout: tuple[tuple[str, str], ...]) -> bool:
    parts = name.split(".")
    for block, module in layout:
        path = ["model", "layers", None, block, module]  # None: the layer index
        if len(parts) > len(path):
            continue
        tail = path[len(path) - len(parts) :]
        if all(_part_matches(part, want, arch) for part, want in zip(parts, tail, strict=True)):
            return True
    return False


def _part_matches(part: str, want: str | None, arch: Architecture) -> bool:
    if want is not None:
        return part == want
    if not (part.isascii() and part.isdigit()) or len(part) > 6:
        return False
    return arch.num_layers is None or int(part) < arch.num_layers


def unknown_modules(target: str | list[str], model: str, settings: Settings) -> tuple[list[str], list[str]] | None:
    """The names that match no module of ``model`` and the module names it offers; None when all match or the
    architecture is not known here (the worker's peft check then remains the only one)."""
    names = split_names(target)
    if names == [ALL]:
        return None
    arch = architecture(model, settings)
    layout = LAYOUTS.get(arch.model_type) if arch else None
    if arch is None or layout is None:
        return None
    unknown = [name for name in names if not _matches(name, arch, layout)]
    if not unknown:
        return None
    return unknown, [module for _, module in layout]
