"""A model folder written out as a GGUF file, so the llama.cpp backend can serve fine-tuned models.

A merged fine-tune is a safetensors folder; llama.cpp reads GGUF. The export writes every weight under llama.cpp's
tensor names (in fp32, or fp16 when it is only the input of a quantisation), then llama.cpp's own quantiser turns
that file into the requested type, so a re-exported base model gets the same per-tensor types as the GGUF the
default model ships in (Q4_1 layers, Q8_0 embeddings).

The file carries no tokenizer (``tokenizer.ggml.model = none`` with the vocabulary size): the engine tokenises
and detokenises with the model's own Hugging Face tokenizer and chat template, the same code training used, and
hands llama.cpp token ids only.

The worker writes the export of a published model next to it (``artifacts.serving``), so the model answers as
soon as it is announced; a folder without one (a base model configured by path, a type it was not published in)
is exported on first load into a cache keyed by the model files' identity (path, size, mtime) and the type.
A file is written beside its final name and renamed into place, so a crash never leaves half a GGUF that looks
whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts.architecture import uses_sliding_window

log = logging.getLogger("conch.artifacts.gguf")

# Hugging Face model type -> llama.cpp architecture. Mistral without a sliding window is a Llama.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose rotary embedding llama.cpp applies to interleaved pairs, while Hugging Face checkpoints
# rotate halves: their q/k rows are reordered on export (the inverse of what transformers' GGUF loader undoes).
INTERLEAVED_ROPE = frozenset({"llama"})
EXPORT_VERSION = 1  # bump when the written layout changes, so older cached files are not reused


class ExportError(Exception):
    """The model cannot be written for llama.cpp (an architecture or rope type it is not mapped for)."""


def unsupported_reason(config: Any) -> str | None:
    if config.model_type not in ARCHITECTURES:
        return f"model type {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if uses_sliding_window(config):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        return f"rope type {rope.get('rope_type')!r}"
    return None


def _interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half order (0..d/2 then d/2..d) to interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _array(tensor: torch.Tensor, half: bool) -> np.ndarray:
    # Norm weights and biases stay fp32, as llama.cpp expects of one-dimensional tensors. The conversion runs in
    # torch: numpy's float16 cast measured 5x slower (0.7 s for the default model).
    dtype = torch.float16 if half and tensor.dim() > 1 else torch.float32
    return np.ascontiguousarray(tensor.detach().cpu().to(dtype).numpy())


def cache_key(folder: Path, file_type: str) -> str:
    """Identity of a model folder's weights and config plus the target type."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([str(folder.resolve()), stamp, file_type, EXPORT_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# Hugging Face checkpoint names -> llama.cpp's, for the Llama family (Llama, Mistral, Qwen2).
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some older checkpoints saved; recomputed by llama.cpp


def gguf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = LAYER_NAME.fullmatch(name)
    if match and match.group(2) in LAYER_NAMES:
        return f"blk.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    raise ExportError(f"the llama.cpp backend has no place for the weight {name!r}")


def write_gguf(folder: Path, config: Any, path: Path, *, half: bool = False) -> None:
    """Write the model in ``folder`` (safetensors of a supported architecture) as a GGUF file: fp32, or with its
    matrices in fp16 when ``half`` (the input of a quantisation, where fp16's rounding is far below the 4- or
    8-bit step and half the bytes to write: fresh memory costs about 3 ms per MB on this kind of machine).

    The tensors are read from the files one at a time (memory-mapped), not through a built model: building the
    module tree first would cost a second and the model's size in memory for nothing."""
    import gguf
    from safetensors import safe_open

    # gguf's writer logs its file list and byte order at INFO for every export; our own line says what matters.
    logging.getLogger("gguf").setLevel(logging.WARNING)
    reason = unsupported_reason(config)
    if reason:
        raise ExportError(f"the llama.cpp backend cannot run this model: {reason}")
    arch = ARCHITECTURES[config.model_type]
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    tied = bool(getattr(config, "tie_word_embeddings", False))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(folder.name)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 4096) or 4096))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_tokenizer_model("none")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32))

    written: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as checkpoint:
            for name in checkpoint.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                if IGNORED.fullmatch(name) or (tied and name == "lm_head.weight"):
                    continue  # a tied head is left out: llama.cpp then reads token_embd
                target = gguf_name(name)
                array = _array(checkpoint.get_tensor(name), half)
                if arch in INTERLEAVED_ROPE and target.endswith(("attn_q.weight", "attn_q.bias")):
                    array = _interleave_rotary(array, heads)
                elif arch in INTERLEAVED_ROPE and target.endswith(("attn_k.weight", "attn_k.bias")):
                    array = _interleave_rotary(array, kv_heads)
                if target == "token_embd.weight":
                    writer.add_vocab_size(int(array.shape[0]))
                writer.add_tensor(target, array)
                written.add(target)
    expected = {"token_embd.weight", "output_norm.weight", *([] if tied else ["output.weight"])}
    expected |= {f"blk.{i}.{n}" for i in range(int(config.num_hidden_layers)) for n in LAYER_NAMES.values()}
    expected -= {name for name in expected if name.endswith(".bias")}  # biases are the architecture's choice
    missing = sorted(expected - written)
    if missing:
        raise ExportError(f"{folder} lacks weights the model needs: {', '.join(missing[:5])}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(
    folder: Path,
    config: Any,
    target: Path,
    file_type: str,
    quantize: Callable[[Path, Path, str], None],
) -> Path:
    """Write ``folder`` as ``target`` in ``file_type`` (f32, f16, bf16, q8_0, q4_1, ...), atomically.

    ``quantize(src, dst, file_type)`` turns the written file (fp32 for f32/bf16 targets, else fp16) into the
    target type (llama.cpp's quantiser)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as scratch:
        exact = file_type in ("f32", "bf16")  # bf16 keeps fp32's range, which fp16 would clip
        full = Path(scratch) / ("f32.gguf" if exact else "f16.gguf")
        write_gguf(folder, config, full, half=not exact)
        written = time.perf_counter()
        if file_type == ("f32" if exact else "f16"):
            final = full  # already the target type (quantising a file onto itself would truncate it mid-read)
        else:
            final = Path(scratch) / f"{file_type}.gguf"
            quantize(full, final, file_type)
        os.replace(final, target)
    log.info(
        "gguf.exported",
        extra={
            "folder": str(folder),
            "file": str(target),
            "file_type": file_type,
            "bytes": target.stat().st_size,
            "write_seconds": round(written - started, 3),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return target


def exported_gguf(
    folder: Path,
    config: Any,
    cache_dir: Path,
    file_type: str,
    quantize: Callable[[Path, Path, str], None],
) -> Path:
    """The cached GGUF of ``folder`` in ``file_type``, written into ``cache_dir`` if missing (a model published
    without its serving files, or served in a type it was not published in)."""
    target = cache_dir / f"{folder.name}-{cache_key(folder, file_type)}.{file_type}.gguf"
    if target.is_file():
        return target
    return export_gguf(folder, config, target, file_type, quantize)
