"""llama.cpp kernels behind the engine's decoder interface (``INFERENCE_BACKEND=llamacpp``).

Why: on a CPU, decoding is bound by reading the weights, and llama.cpp's quantised dot products read them faster
than PyTorch's (the benchmark, default model, 1 thread: 65 tokens/s with Q4_1 and 112 with Q4_0 here, 47 on the
torch int4 route). The engine keeps everything else: continuous batching, chunked prefill,
sampling, stop handling, the Hugging Face tokenizer and chat template, so answers are rendered and read exactly as
on the other backends.

The mapping: each row of the engine's batch is one llama.cpp *sequence* in a single context (``n_seq_max`` =
the engine's batch size, one KV cache of ``n_seq_max`` x the per-sequence context; the engine stops each row at
its share, so no answer can take another's room). ``forward`` turns the engine's
left-padded [rows, columns] block into one ``llama_batch`` of the real tokens, each tagged with its row's
sequence id and position, and asks for logits at each row's last token only. A row that leaves the batch has its
sequence removed from the KV cache and its id returned to the pool.

Everything here runs on the engine's generation thread, the only user of the context.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("conch.inference.llamacpp")

# Settings' quantisation names -> llama.cpp file types. "none" keeps the served precision (fp32 by default);
# int4 is Q4_1, the form the default model ships in. llama.cpp's own type names are accepted too: Q4_0 decodes
# fastest on an AVX-512 CPU (its weights are repacked for batched products) but keeps no per-group minimum.
FILE_TYPES = {"none": "f32", "int8": "q8_0", "int4": "q4_1"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1", "q4_0", "iq4_nl")
DENSE_FILE_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

_backend_ready = threading.Lock()
_backend_initialised = False
_ERROR_LEVEL = 4  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_log_callback: Any = None  # kept alive for as long as the library may call it


def _route_native_log(level: int, text: bytes, _user_data: Any) -> None:
    """llama.cpp's own lines go to our logger: errors as warnings, the rest (every load prints dozens, and a
    GGUF without a tokenizer always warns about its placeholder vocabulary) at debug."""
    message = text.decode("utf-8", "replace").rstrip()
    if message:
        log.log(logging.WARNING if level == _ERROR_LEVEL else logging.DEBUG, "llamacpp.native: %s", message)


class LlamaCppUnavailable(Exception):
    """llama-cpp-python is not installed (it is the ``llamacpp`` extra)."""


def library() -> Any:
    """The llama_cpp module, initialised once per process with its chatter limited to errors."""
    global _backend_initialised, _log_callback
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppUnavailable(
            "INFERENCE_BACKEND=llamacpp needs llama-cpp-python: pip install 'conch[llamacpp]'"
        ) from exc
    with _backend_ready:
        if not _backend_initialised:
            # Its default callback prints every loader line to stderr (and reads warnings as errors).
            _log_callback = llama_cpp.llama_log_callback(_route_native_log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_initialised = True
    return llama_cpp


def check_quant(quant: str) -> str:
    name = (quant or "none").lower()
    if name not in FILE_TYPES and name not in GGUF_TYPES:
        choices = ", ".join([*FILE_TYPES, *GGUF_TYPES[1:]])
        raise ValueError(f"INFERENCE_QUANT with INFERENCE_BACKEND=llamacpp must be one of {choices}, not {quant!r}")
    return name


def file_type_for(quant: str, dtype: torch.dtype) -> str:
    if quant == "none":
        return DENSE_FILE_TYPES.get(dtype, "f32")
    return FILE_TYPES.get(quant, quant)


def quantize(src: Path, dst: Path, file_type: str, threads: int = 0) -> None:
    """llama.cpp's own quantiser: the same per-tensor choices as the GGUF files it publishes."""
    lib = library()
    codes = {
        "f32": lib.LLAMA_FTYPE_ALL_F32,
        "f16": lib.LLAMA_FTYPE_MOSTLY_F16,
        "bf16": lib.LLAMA_FTYPE_MOSTLY_BF16,
        "q8_0": lib.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_1": lib.LLAMA_FTYPE_MOSTLY_Q4_1,
        "q4_0": lib.LLAMA_FTYPE_MOSTLY_Q4_0,
        "iq4_nl": lib.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    }
    params = lib.llama_model_quantize_default_params()
    params.ftype = codes[file_type]
    params.nthread = threads
    status = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantise {src.name} to {file_type} (status {status})")


class SequenceCache:
    """The engine's view of some rows' state in the llama.cpp context: one sequence id and next position per row."""

    def __init__(self, decoder: LlamaCppDecoder, seqs: list[int]) -> None:
        self.decoder = decoder
        self.seqs = seqs
        self.positions = [0] * len(seqs)
        self.length = 0  # prompt columns read so far (the engine's prefill progress)

    def select(self, rows: list[int]) -> None:
        kept = set(rows)
        self.decoder.free([seq for index, seq in enumerate(self.seqs) if index not in kept])
        self.seqs = [self.seqs[i] for i in rows]
        self.positions = [self.positions[i] for i in rows]

    def extend(self, other: SequenceCache) -> None:
        self.seqs += other.seqs
        self.positions += other.positions
        other.seqs, other.positions = [], []  # its sequences belong to this cache now

    def release(self) -> None:
        self.decoder.free(self.seqs)
        self.seqs, self.positions = [], []


class LlamaCppDecoder:
    def __init__(
        self,
        gguf_path: Path,
        *,
        max_sequences: int,
        context_per_sequence: int,
        threads: int,
        batch_tokens: int,
        file_type: str,
        gpu: bool = False,
    ) -> None:
        lib = self._lib = library()
        self.path = gguf_path
        self.dtype = torch.float32  # the logits it returns
        self.device = torch.device("cpu")
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 999 if gpu else 0
        self._model = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.max_sequences = max(1, max_sequences)
        self.batch_tokens = max(batch_tokens, self.max_sequences)
        params = lib.llama_context_default_params()
        params.n_ctx = context_per_sequence * self.max_sequences
        params.n_seq_max = self.max_sequences
        # One cache for every sequence: separate per-sequence streams measured no faster here (67 against 70
        # tokens/s for 8 streams), and each row's length is capped by the engine either way.
        params.kv_unified = True
        params.n_batch = self.batch_tokens
        params.n_ubatch = min(self.batch_tokens, 512)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # The KV cache stays llama.cpp's f16 even on the f32 route: on the default model an fp32 cache changed no
        # fewer greedy answers (1 of 16 against the lean fp32 decoder either way) for twice the memory.
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}")
        self.context_per_sequence = int(lib.llama_n_ctx(self._ctx)) // self.max_sequences
        self._memory = lib.llama_get_memory(self._ctx)
        self.vocab_size = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        self._batch = lib.llama_batch_init(self.batch_tokens, 0, 1)
        self._free_seqs = list(range(self.max_sequences))
        self.quant = file_type  # what /readyz shows as the route
        self._closed = False

    @property
    def parameter_bytes(self) -> int:
        return int(self._lib.llama_model_size(self._model))

    # ------------------------------------------------------------------------------- sequences

    def new_cache(self, batch: int, capacity: int) -> SequenceCache:
        if batch > len(self._free_seqs):
            raise RuntimeError(f"{batch} new rows but only {len(self._free_seqs)} free llama.cpp sequences")
        seqs, self._free_seqs = self._free_seqs[:batch], self._free_seqs[batch:]
        return SequenceCache(self, seqs)

    @property
    def free_sequences(self) -> int:
        return len(self._free_seqs)

    def free(self, seqs: list[int]) -> None:
        if self._closed:
            return
        for seq in seqs:
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free_seqs.extend(seqs)

    # ------------------------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, cache: SequenceCache) -> torch.Tensor:
        """Feed the real tokens of ``input_ids`` [rows, steps] (``new_mask`` marks them); fp32 logits of each row's
        last real token [rows, vocab] (zeros for a row with no token in this block)."""
        ids, mask = input_ids.tolist(), new_mask.tolist()
        tokens: list[tuple[int, int, int]] = []  # (token, position, sequence)
        last_of_row: dict[int, int] = {}
        for row, (row_ids, row_mask) in enumerate(zip(ids, mask, strict=True)):
            for token, real in zip(row_ids, row_mask, strict=True):
                if real:
                    last_of_row[row] = len(tokens)
                    tokens.append((token, cache.positions[row], cache.seqs[row]))
                    cache.positions[row] += 1
        cache.length += input_ids.shape[1]
        logits = np.zeros((len(ids), self.vocab_size), dtype=np.float32)
        wanted = {index: row for row, index in last_of_row.items()}
        for start in range(0, len(tokens), self.batch_tokens):
            self._decode(tokens[start : start + self.batch_tokens], start, wanted, logits)
        return torch.from_numpy(logits)

    def _decode(
        self, piece: list[tuple[int, int, int]], offset: int, wanted: dict[int, int], logits: np.ndarray
    ) -> None:
        lib, batch = self._lib, self._batch
        outputs: list[tuple[int, int]] = []  # (index in this piece, row)
        for index, (token, position, seq) in enumerate(piece):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            row = wanted.get(offset + index)
            batch.logits[index] = row is not None
            if row is not None:
                outputs.append((index, row))
        batch.n_tokens = len(piece)
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} (KV cache full or bad batch)")
        for index, row in outputs:
            pointer = lib.llama_get_logits_ith(self._ctx, index)
            logits[row] = np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))

    # ------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Free the context and the weights (the engine thread calls this when it ends)."""
        if self._closed:
            return
        self._closed = True
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
        self._lib.llama_model_free(self._model)
        log.info("llamacpp.closed", extra={"file": str(self.path)})
