"""Facts about a model's config that both serving routes and the GGUF export depend on."""

from __future__ import annotations

from typing import Any


def uses_sliding_window(config: Any) -> bool:
    """Sliding-window attention (Qwen2's flag, or a Mistral window), which neither the lean decoder nor the GGUF
    export reproduces."""
    return bool(
        getattr(config, "use_sliding_window", False)
        or (config.model_type == "mistral" and getattr(config, "sliding_window", None))
    )
