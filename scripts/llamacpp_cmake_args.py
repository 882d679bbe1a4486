#!/usr/bin/env python3
"""Print the CMAKE_ARGS for building llama-cpp-python's llama.cpp portably, one shell-quoted line.

The default build (GGML_NATIVE=ON, i.e. -march=native) compiles in whatever the build machine has, AMX
included: on Intel Xeons with AMX (Sapphire Rapids and later) that path segfaults at the first decode of every
quantised type (ggml-org/llama.cpp#20824). So native optimisation is off and each x86 instruction set is named:

- by default (``--host``), ON where this machine's /proc/cpuinfo flags have it, OFF otherwise;
- with ``--portable``, a fixed AVX2/FMA/F16C/BMI2 baseline, for images built on one machine and run on another.

AMX is always OFF, and the multimodal library (unused) is not built. The user's own CMAKE_ARGS (environment, or
``--user-args``), e.g. ``-DGGML_CUDA=on``, are appended; an option the user names replaces the one set here, so
AMX or native optimisation only come back when asked for explicitly.

Usage: CMAKE_ARGS="$(python3 scripts/llamacpp_cmake_args.py [--portable])" pip wheel llama-cpp-python==...
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# Each ggml x86 option and the /proc/cpuinfo flags it needs (GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw).
ISA_FLAGS: Mapping[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
# x86-64-v3: every x86 server CPU of the last decade (Intel Haswell, AMD Zen and later).
PORTABLE = frozenset({"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"})
AMX = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
ON_VALUES = frozenset({"ON", "1", "TRUE", "YES", "Y"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The instruction-set flags of the first processor in a /proc/cpuinfo text (empty on non-x86 machines)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def option_name(arg: str) -> str | None:
    """``-DNAME=VALUE`` or ``-DNAME:TYPE=VALUE`` -> NAME; None for anything else."""
    if not arg.startswith("-D") or "=" not in arg:
        return None
    return arg[2:].split("=", 1)[0].split(":", 1)[0]


def options(args: Iterable[str]) -> dict[str, bool]:
    """The options a CMAKE_ARGS list sets, each ON (True) or OFF; the last setting wins, as in CMake."""
    found: dict[str, bool] = {}
    for arg in args:
        name = option_name(arg)
        if name is not None:
            found[name] = arg.split("=", 1)[1].strip().upper() in ON_VALUES
    return found


def cmake_args(flags: Iterable[str], *, portable: bool = False, user_args: Sequence[str] = ()) -> list[str]:
    """The CMAKE_ARGS for a build on a machine with these cpuinfo flags (ignored when ``portable``)."""
    have = frozenset(flags)
    enabled = PORTABLE if portable else frozenset(name for name, needs in ISA_FLAGS.items() if have.issuperset(needs))
    ours = ["-DGGML_NATIVE=OFF"]
    ours += [f"-D{name}={'ON' if name in enabled else 'OFF'}" for name in ISA_FLAGS]
    ours += [f"-D{name}=OFF" for name in AMX]
    ours.append("-DLLAVA_BUILD=OFF")
    named_by_user = {name for name in map(option_name, user_args) if name is not None}
    return [arg for arg in ours if option_name(arg) not in named_by_user] + list(user_args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--host", action="store_true", help="instruction sets of this machine (the default)")
    target.add_argument("--portable", action="store_true", help="a fixed AVX2/FMA/F16C/BMI2 baseline")
    parser.add_argument("--cpuinfo", type=Path, default=Path("/proc/cpuinfo"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--user-args", default=os.environ.get("CMAKE_ARGS", ""), help="extra CMake arguments (default: $CMAKE_ARGS)"
    )
    parsed = parser.parse_args(argv)
    flags: frozenset[str] = frozenset()
    if not parsed.portable:
        try:
            flags = cpu_flags(parsed.cpuinfo.read_text())
        except OSError:
            print(f"llamacpp_cmake_args: cannot read {parsed.cpuinfo}; no x86 extensions enabled", file=sys.stderr)
    print(shlex.join(cmake_args(flags, portable=parsed.portable, user_args=shlex.split(parsed.user_args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
