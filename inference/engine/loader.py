"""Loading a model folder for serving: safetensors only, no remote code, the template it was trained with.

The folder's tokenizer, config and stops are read here; the decoder that runs it comes from the backend
(``backends.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from core.control_tokens import ControlTokens
from core.templates import Message, render_prompt, stop_strings, template_text
from inference.engine.backends import (
    Decoder,
    DecoderInputs,
    LlamaCppOptions,
    ModelLoadError,
    backend_named,
)
from inference.engine.device import choose_device, choose_dtype, dtype_name

log = logging.getLogger("conch.inference.loader")

# Rotary tables and caches are sized from the model's context; a config claiming millions of positions
# should not make a small server allocate for them.
MAX_CONTEXT = 65536

# transformers' from_pretrained is not thread-safe: it swaps process-wide state while it builds a model on the
# meta device, so two loads at once (a deployment loading in the background while a request loads another model
# on demand) can leave one model with tensors that were never materialised. Loads take turns.
_FROM_PRETRAINED = threading.Lock()


def from_pretrained_lock() -> threading.Lock:
    """Held around every transformers load in this process (see above)."""
    return _FROM_PRETRAINED


@dataclass
class LoadedModel:
    name: str
    folder: Path
    tokenizer: Any
    decoder: Decoder[Any]
    template: str
    backend: str
    max_positions: int
    pad_id: int
    eos_ids: frozenset[int]
    stop_token_ids: frozenset[int]
    stop_texts: tuple[str, ...]
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)
    load_seconds: float = 0.0
    route: str = ""  # the registry's name for the route serving it, e.g. llamacpp:bf16
    cache_rows: int = 1  # the sequences its engine runs at once (the service's MAX_BATCH_SIZE)

    @property
    def weight_bytes(self) -> int:
        return self.decoder.parameter_bytes

    @property
    def cache_bytes(self) -> int:
        """The most its KV cache can take: every row of the engine's batch at the full context."""
        return self.decoder.cache_bytes(self.cache_rows, self.max_positions)

    @property
    def size_bytes(self) -> int:
        """What the memory budget counts: the weights and the KV cache."""
        return self.weight_bytes + self.cache_bytes

    @property
    def dtype(self) -> str:
        return dtype_name(self.decoder.dtype)

    @property
    def quant(self) -> str:
        return str(getattr(self.decoder, "quant", "none"))

    @cached_property
    def control_tokens(self) -> ControlTokens:
        return ControlTokens(self.tokenizer, template_text(self.template, self.tokenizer))

    def render_chat(self, messages: list[Message]) -> str:
        # The same code the training pipeline renders examples with, so the model sees what it learned.
        return render_prompt(self.tokenizer, messages, self.template)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Only the template's own markers become control tokens; a ``<|im_end|>`` typed in a message is text
        (``core.control_tokens``). The rendered text already holds its special tokens; adding the tokenizer's
        would double them."""
        control = self.control_tokens
        return control.encode(self.render_chat(control.mark(messages)))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])


# Tokenizer files: a fine-tune carries its base's, byte for byte. Reading them again costs 0.3-0.9 s of a
# swap (measured on the default model, 2 cores), so a tokenizer is loaded once per content and shared.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_TOKENIZERS: OrderedDict[str, Any] = OrderedDict()
_TOKENIZERS_KEPT = 8


def _tokenizer(folder: Path, auto_tokenizer: Any) -> Any:
    """The folder's tokenizer, shared with every other loaded folder whose tokenizer files hold the same bytes
    (a fast tokenizer only reads its state while encoding, so sharing one is safe). Caller holds the load lock."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    key = digest.hexdigest()
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        tokenizer = auto_tokenizer.from_pretrained(folder, trust_remote_code=False)
        _TOKENIZERS[key] = tokenizer
        while len(_TOKENIZERS) > _TOKENIZERS_KEPT:
            _TOKENIZERS.popitem(last=False)
    _TOKENIZERS.move_to_end(key)
    return tokenizer


def check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder} has no .safetensors weights (other weight formats are refused)")
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/config.json is unreadable: {exc}") from exc


def _token_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _sampling_defaults(config: Any) -> dict[str, float | int]:
    """The model's own generation defaults, used when a request leaves a knob unset (greedy unless it samples)."""
    if config is None or not getattr(config, "do_sample", False):
        return {}
    defaults: dict[str, float | int] = {}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = getattr(config, key, None)
        if value is not None:
            defaults[key] = value
    return defaults


def load_model(
    name: str,
    folder: Path,
    *,
    template: str = "auto",
    device_setting: str = "auto",
    dtype_setting: str = "auto",
    backend_setting: str = "auto",
    quant_setting: str = "none",
    llamacpp: LlamaCppOptions | None = None,
    cache_rows: int = 1,
) -> LoadedModel:
    """``cache_rows``: the sequences the model's engine will run at once, for the size its KV cache can reach."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    check_folder(folder)
    device = choose_device(device_setting)
    try:
        backend = backend_named(backend_setting)
        quant = backend.check(quant_setting, device, llamacpp)
        dtype = choose_dtype(dtype_setting, device)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    torch_model: Any = None
    config: Any
    generation: Any
    try:
        with _FROM_PRETRAINED:
            tokenizer = _tokenizer(folder, AutoTokenizer)
            if backend.loads_torch_model:
                torch_model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
                )
                torch_model = torch_model.to(device).eval()
                config, generation = torch_model.config, torch_model.generation_config
            else:
                config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
                generation = _generation_config(folder, config)
    except Exception as exc:  # whatever the library raises, the caller needs one kind: this folder is unusable
        raise ModelLoadError(f"cannot load {folder}: {type(exc).__name__}: {exc}") from exc
    max_positions = min(int(getattr(config, "max_position_embeddings", 4096) or 4096), MAX_CONTEXT)
    built = backend.build(DecoderInputs(folder, config, torch_model, quant, dtype, device, max_positions, llamacpp))
    # The lean decoder holds the weight tensors themselves; the module tree can go (the reference decoder keeps it).
    del torch_model

    eos_ids = _token_ids(getattr(generation, "eos_token_id", None)) | _token_ids(tokenizer.eos_token_id)
    stop_ids, stop_texts = set(eos_ids), []
    for text in stop_strings(template, tokenizer):
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tokenizer.unk_token_id and text in tokenizer.get_vocab():
            stop_ids.add(token)  # special tokens are dropped from decoded text, so they stop by id
        else:
            stop_texts.append(text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    loaded = LoadedModel(
        name=name,
        folder=folder,
        tokenizer=tokenizer,
        decoder=built.decoder,
        template=template,
        backend=built.backend,
        max_positions=built.max_positions,
        pad_id=int(pad),
        eos_ids=frozenset(eos_ids),
        stop_token_ids=frozenset(stop_ids),
        stop_texts=tuple(stop_texts),
        sampling_defaults=_sampling_defaults(generation),
        cache_rows=max(1, cache_rows),
    )
    loaded.load_seconds = time.perf_counter() - started
    log.info(
        "model.loaded",
        extra={
            "model": name,
            "folder": str(folder),
            "backend": built.backend,
            "dtype": dtype_name(dtype),
            "quant": quant,
            "device": str(device),
            "bytes": loaded.size_bytes,
            "cache_bytes": loaded.cache_bytes,
            "seconds": round(loaded.load_seconds, 3),
            **built.notes,
        },
    )
    return loaded


def _generation_config(folder: Path, config: Any) -> Any:
    """The folder's generation_config.json, or the defaults derived from its config (as from_pretrained does)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_model_config(config)
