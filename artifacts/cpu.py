"""What this CPU can do fast, from ``/proc/cpuinfo``: the default serving type depends on it.

Measured on the default model (2-vCPU AMD EPYC with AVX-512 BF16, llama.cpp, one stream): bf16 weights decode
about 2x faster than f32 and keep next-token agreement with the fp32 reference above 99% (README, benchmarks).
A CPU without native bf16 dot products (no ``avx512_bf16``/``amx_bf16``) converts every bf16 weight in software;
there f16, converted by the F16C unit every x86-64 CPU of the last decade has, is the half-size type.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The flags of the first processor listed (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str]) -> bool:
    return bool(flags & BF16_FLAGS)


def half_type(flags: frozenset[str]) -> str:
    """The 16-bit GGUF type this CPU computes fastest: bf16 where it has bf16 dot products, else f16."""
    return "bf16" if has_native_bf16(flags) else "f16"
