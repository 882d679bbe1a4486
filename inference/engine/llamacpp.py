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

import logging
from pathlib import Path

import numpy as np
import torch

from artifacts.llamacpp import GGUF_TYPES, buffer_types, capture_native_log, library, model_params
from inference.engine.cache import KV_CACHE_BYTES_LLAMACPP

log = logging.getLogger("conch.inference.llamacpp")

# Settings' quantisation names -> llama.cpp file types. "none" keeps the served precision (fp32 by default);
# int4 is Q4_1, the form the default model ships in. llama.cpp's own type names are accepted too: Q4_0 decodes
# fastest on an AVX-512 CPU (its weights are repacked for batched products) but keeps no per-group minimum.
FILE_TYPES = {"none": "f32", "int8": "q8_0", "int4": "q4_1"}
DENSE_FILE_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


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


def _common_prefix(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(tokens) for tokens in sequences)
    for index in range(length):
        if any(tokens[index] != first[index] for tokens in sequences[1:]):
            return index
    return length


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
        batch_threads: int = 0,
        batch_tokens: int,
        file_type: str,
        gpu: bool = False,
        kv_values_per_token: int = 0,
    ) -> None:
        lib = self._lib = library()
        self.path = gguf_path
        self.dtype = torch.float32  # the logits it returns
        self.device = torch.device("cpu")
        with capture_native_log() as native_lines:
            self._model = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params(gpu=gpu))
        # Where the weights went (CPU_Mapped, CPU_REPACK, ...): /readyz shows it, and a test holds that no
        # weight ever lands in the AMX buffer.
        self.buffer_types = buffer_types(native_lines)
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
        # llama.cpp uses n_threads for one-token batches and n_threads_batch for the rest (prompts, and decode
        # steps of several rows): see inference.engine.device.generation_threads for why they differ.
        params.n_threads = threads
        params.n_threads_batch = batch_threads or threads
        params.no_perf = True
        # The KV cache stays llama.cpp's f16 even on the f32 route: on the default model an fp32 cache changed no
        # fewer greedy answers (1 of 16 against the lean fp32 decoder either way) for twice the memory.
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}")
        self.context_tokens = int(lib.llama_n_ctx(self._ctx))
        self.context_per_sequence = self.context_tokens // self.max_sequences
        self.kv_values_per_token = kv_values_per_token
        self._memory = lib.llama_get_memory(self._ctx)
        self.vocab_size = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        self._batch = lib.llama_batch_init(self.batch_tokens, 0, 1)
        self._free_seqs = list(range(self.max_sequences))
        self.quant = file_type  # what /readyz shows as the route
        self._closed = False

    def set_threads(self, decode: int, prefill: int) -> None:
        self._lib.llama_set_n_threads(self._ctx, decode, prefill)

    @property
    def parameter_bytes(self) -> int:
        return int(self._lib.llama_model_size(self._model))

    def cache_bytes(self, rows: int, tokens_per_row: int) -> int:
        # Allocated whole when the context was made: every sequence's share, used or not.
        return self.context_tokens * self.kv_values_per_token * KV_CACHE_BYTES_LLAMACPP

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
        """Decode ``piece`` (token, position, sequence); copy the logits of the tokens whose index (``offset`` +
        index in the piece) ``wanted`` maps to a row of ``logits``."""
        if self._closed:  # its native memory is gone: touching it would crash the process, not raise
            raise RuntimeError(f"the llama.cpp context of {self.path.name} is closed")
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

    def score(self, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        """Teacher-forced logits of each (tokens, first) sequence: after each of ``tokens[first:]`` [positions,
        vocab]: the fidelity gate's fast path, which decides how soon a new model answers.

        The golden prompts share their opening (the chat template's system turn), so it is read once and its KV
        entries are shared with every other sequence (``llama_memory_seq_cp``, no copy in a unified cache); the
        rest of every sequence then goes through together, one batch per ``batch_tokens``. The engine's rows are
        untouched: the gate runs before the engine starts."""
        results: list[np.ndarray] = []
        room = max(1, len(self._free_seqs))
        for group_start in range(0, len(sequences), room):
            group = sequences[group_start : group_start + room]
            cache = self.new_cache(len(group), 0)
            try:
                results += self._score_group(group, cache.seqs)
            finally:
                cache.release()
        return results

    def _score_group(self, group: list[tuple[list[int], int]], seqs: list[int]) -> list[np.ndarray]:
        shared = _common_prefix([tokens for tokens, _ in group])
        shared = min(shared, *(first for _, first in group))  # no logits are wanted from the shared part
        outputs = [np.zeros((len(tokens) - first, self.vocab_size), dtype=np.float32) for tokens, first in group]
        if shared:
            prefix = [(token, position, seqs[0]) for position, token in enumerate(group[0][0][:shared])]
            for start in range(0, len(prefix), self.batch_tokens):
                self._decode(prefix[start : start + self.batch_tokens], start, {}, outputs[0])
            for seq in seqs[1:]:
                self._lib.llama_memory_seq_cp(self._memory, seqs[0], seq, 0, shared)
        piece: list[tuple[int, int, int]] = []
        wanted: dict[int, int] = {}
        rows: list[tuple[int, int]] = []  # output row -> (sequence, position)
        for index, ((tokens, first), seq) in enumerate(zip(group, seqs, strict=True)):
            for position in range(shared, len(tokens)):
                if position >= first:
                    wanted[len(piece)] = len(rows)
                    rows.append((index, position - first))
                piece.append((tokens[position], position, seq))
        flat = np.zeros((len(rows), self.vocab_size), dtype=np.float32)
        for start in range(0, len(piece), self.batch_tokens):
            self._decode(piece[start : start + self.batch_tokens], start, wanted, flat)
        for row, (index, position) in enumerate(rows):
            outputs[index][position] = flat[row]
        return outputs

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
