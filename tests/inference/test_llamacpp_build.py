"""The llama.cpp build: never -march=native and never AMX, whose kernels segfault at the first decode of every
quantised model on Intel Xeons that have it (ggml-org/llama.cpp#20824); and the library installed is the one
scripts/bootstrap.sh built with scripts/llamacpp_cmake_args.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(sys.prefix) / "llamacpp-build.json"


def _load_args_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llamacpp_cmake_args", ROOT / "scripts" / "llamacpp_cmake_args.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_args_script()

BASE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx "
    "pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma "
    "cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves"
)
# A 2-vCPU AMD EPYC (Zen 4) as this project's machines report it.
EPYC_ZEN4 = (
    f"{BASE} mmxext fxsr_opt extd_apicid cmp_legacy cr8_legacy sse4a misalignsse osvw topoext vmmcall avx512_bf16 "
    "clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
    "avx512_vpopcntdq rdpid fsrm"
)
# An Intel Xeon Sapphire Rapids VM: AVX-VNNI and AMX besides AVX-512.
XEON_SPR = (
    f"{BASE} ss arch_perfmon xtopology tsc_reliable cpuid_fault ssbd ibrs ibpb stibp ibrs_enhanced avx_vnni "
    "avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni "
    "avx512_bitalg avx512_vpopcntdq la57 rdpid cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk "
    "amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities"
)
AVX512_SETS = {"GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}
AMX = {"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"}


def _options(flags: str, **kwargs: object) -> dict[str, bool]:
    cpuinfo = f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\nbugs\t\t: none\n"
    return dict(build.options(build.cmake_args(build.cpu_flags(cpuinfo), **kwargs)))


def _enabled(options: dict[str, bool]) -> set[str]:
    return {name for name, on in options.items() if on}


@pytest.mark.parametrize(
    ("flags", "expected_on"),
    [
        (EPYC_ZEN4, set(build.PORTABLE) | AVX512_SETS),
        (XEON_SPR, set(build.PORTABLE) | AVX512_SETS | {"GGML_AVX_VNNI"}),
        ("fpu sse sse2 ssse3 sse4_1 sse4_2 avx", {"GGML_SSE42", "GGML_AVX"}),  # AVX2 et al. OFF, not ggml's default ON
    ],
    ids=["epyc-zen4", "xeon-sapphire-rapids", "avx-only"],
)
def test_the_build_names_this_cpus_instruction_sets_never_native_never_amx(flags: str, expected_on: set[str]) -> None:
    options = _options(flags)
    assert options["GGML_NATIVE"] is False
    assert all(options[name] is False for name in AMX)
    assert options["LLAVA_BUILD"] is False
    assert set(build.ISA_FLAGS) <= set(options)  # each one explicit: ggml's defaults turn some ON
    assert _enabled(options) == expected_on


def test_the_portable_baseline_is_the_same_on_every_cpu() -> None:
    for flags in (EPYC_ZEN4, XEON_SPR, ""):
        options = _options(flags, portable=True)
        assert _enabled(options) == {f"GGML_{n}" for n in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")}
        assert options["GGML_NATIVE"] is False and not AMX & _enabled(options)


def test_user_arguments_are_added_and_amx_stays_off_unless_named() -> None:
    args = build.cmake_args(build.cpu_flags(f"flags: {XEON_SPR}"), user_args=["-DGGML_CUDA=on"])
    assert args[-1] == "-DGGML_CUDA=on"
    options = build.options(args)
    assert options["GGML_CUDA"] is True and options["GGML_NATIVE"] is False
    assert not AMX & _enabled(options)
    # Asked for explicitly, it is the user's choice, and the only setting of that option.
    args = build.cmake_args(build.cpu_flags(f"flags: {XEON_SPR}"), user_args=["-DGGML_AMX_INT8:BOOL=ON"])
    assert [a for a in args if "AMX_INT8" in a] == ["-DGGML_AMX_INT8:BOOL=ON"]


def test_the_command_prints_shell_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {XEON_SPR}\n")
    assert build.main(["--cpuinfo", str(cpuinfo), "--user-args", "-DGGML_CUDA=on -DCMAKE_BUILD_TYPE=Release"]) == 0
    words = capsys.readouterr().out.split()
    assert words[0] == "-DGGML_NATIVE=OFF" and words[-2:] == ["-DGGML_CUDA=on", "-DCMAKE_BUILD_TYPE=Release"]
    assert "-DGGML_AMX_INT8=OFF" in words and "-DGGML_AVX512=ON" in words


def _system_info() -> tuple[str, dict[str, str]]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra `llamacpp`)")
    text = llama_cpp.llama_print_system_info().decode()
    features = {}
    for part in text.replace("\n", "|").split("|"):
        name, sep, value = part.partition("=")
        if sep:
            features[name.split(":")[-1].strip()] = value.strip()
    return text, features


def test_the_installed_library_has_no_amx() -> None:
    text, features = _system_info()
    assert "AMX" not in text, text
    assert features.get("AVX2") == "1", text  # any x86 build this project makes has at least the baseline


def test_the_installed_library_is_the_one_built_with_the_recorded_arguments() -> None:
    text, features = _system_info()
    assert RECORD.is_file(), f"{RECORD} is missing: install llama-cpp-python with scripts/bootstrap.sh"
    record = json.loads(RECORD.read_text())
    import llama_cpp

    assert record["version"] == llama_cpp.__version__
    options = build.options(record["cmake_args"])
    assert options["GGML_NATIVE"] is False
    assert not AMX & _enabled(options)
    # The library reports each instruction set it was compiled with (SSE4.2 is not among those it lists).
    for name in set(build.ISA_FLAGS) - {"GGML_SSE42"}:
        shown = features.get(name.removeprefix("GGML_")) == "1"
        assert shown is options.get(name, False), f"{name}: recorded {options.get(name)}, library says {text}"
