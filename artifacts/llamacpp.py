"""llama.cpp's library, initialised once per process: its quantiser (used at publish and at load) and the guard
that keeps weights out of its AMX path.

The AMX guard. llama.cpp built with ``-march=native`` on an Intel Xeon with AMX compiles an AMX matrix-product
path in (``AMX_INT8 = 1`` in its system info) and repacks quantised weights into an "AMX" buffer; on the Xeon
machines this project runs on, every quantised type then segfaults at the first decode (ggml-org/llama.cpp#20824;
f32 and bf16 are unaffected, AMX has no kernel for them). Conch's install builds llama.cpp without AMX
(``scripts/llamacpp_cmake_args.py``). A library built elsewhere (a plain ``pip install llama-cpp-python`` builds
natively) is still guarded here: when its system info says AMX was compiled in, models load with
``use_extra_bufts`` off, so no weight is placed in the AMX buffer (the AVX-512 repacking of Q4_0 goes with it,
which is the price of running at all).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("conch.artifacts.llamacpp")

# llama.cpp file types Conch exports to (by llama.cpp's own names).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1", "q4_0", "iq4_nl")

_backend_ready = threading.Lock()
_backend_initialised = False
_ERROR_LEVEL = 4  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_log_callback: Any = None  # kept alive for as long as the library may call it
_captured = threading.local()  # native log lines of the current thread's load, while capture_native_log runs


class LlamaCppUnavailable(Exception):
    """llama-cpp-python is not installed (it is the ``llamacpp`` extra)."""


def _route_native_log(level: int, text: bytes, _user_data: Any) -> None:
    """llama.cpp's own lines go to our logger: errors as warnings, the rest (every load prints dozens, and a
    GGUF without a tokenizer always warns about its placeholder vocabulary) at debug."""
    message = text.decode("utf-8", "replace").rstrip()
    if not message:
        return
    lines = getattr(_captured, "lines", None)
    if lines is not None:
        lines.append(message)
    log.log(logging.WARNING if level == _ERROR_LEVEL else logging.DEBUG, "llamacpp.native: %s", message)


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def library() -> Any:
    """The llama_cpp module, initialised once per process with its chatter limited to errors."""
    global _backend_initialised, _log_callback
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppUnavailable("the llama.cpp route needs llama-cpp-python: pip install 'conch[llamacpp]'") from exc
    with _backend_ready:
        if not _backend_initialised:
            # Its default callback prints every loader line to stderr (and reads warnings as errors).
            _log_callback = llama_cpp.llama_log_callback(_route_native_log)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_initialised = True
    return llama_cpp


@contextmanager
def capture_native_log() -> Iterator[list[str]]:
    """The native log lines this thread's llama.cpp calls print meanwhile (e.g. which buffers a load used)."""
    lines: list[str] = []
    _captured.lines = lines
    try:
        yield lines
    finally:
        _captured.lines = None


def system_info() -> str:
    """llama.cpp's own account of what it was compiled with, e.g. ``CPU : AVX2 = 1 | AVX512 = 1 | ...``."""
    return bytes(library().llama_print_system_info()).decode("utf-8", "replace")


def compiled_features(info: str) -> dict[str, bool]:
    """``{"AVX2": True, "AMX_INT8": False, ...}`` from a system-info string."""
    features: dict[str, bool] = {}
    for part in info.replace("CPU :", "|").split("|"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            features[name.strip()] = value.strip() == "1"
    return features


def amx_compiled_in(info: str) -> bool:
    return any(value for name, value in compiled_features(info).items() if name.startswith("AMX"))


def model_params(*, gpu: bool) -> Any:
    """Default model parameters with the AMX guard applied (see the module docstring)."""
    lib = library()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 999 if gpu else 0
    if amx_compiled_in(system_info()):
        params.use_extra_bufts = False
        log.warning("llamacpp.amx_guard", extra={"reason": "AMX compiled in; weights kept out of the AMX buffer"})
    return params


def buffer_types(native_lines: list[str]) -> list[str]:
    """Names of the buffers a model load placed weights in (``CPU_Mapped``, ``CPU_REPACK``, ``AMX``, ...), read
    from llama.cpp's ``<name> model buffer size = ...`` lines."""
    names = []
    for line in native_lines:
        head, sep, _ = line.partition(" model buffer size")
        if sep:
            names.append(head.rsplit(":", 1)[-1].strip())
    return names


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
