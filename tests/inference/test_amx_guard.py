"""The runtime half of the AMX guard (the build half is test_llamacpp_build.py): a llama.cpp library that says
AMX was compiled in loads models with its extra buffers off, and no weight of a model loaded here ever lands
in an AMX buffer."""

from __future__ import annotations

from pathlib import Path

import pytest

from artifacts.llamacpp import amx_compiled_in, buffer_types, compiled_features

pytestmark = pytest.mark.native

SAPPHIRE_RAPIDS_NATIVE = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
EPYC_PORTABLE = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)


def test_the_system_info_says_whether_amx_is_compiled_in() -> None:
    assert compiled_features(EPYC_PORTABLE)["AVX512_BF16"] is True
    assert amx_compiled_in(SAPPHIRE_RAPIDS_NATIVE)
    assert not amx_compiled_in(EPYC_PORTABLE)
    assert not amx_compiled_in(EPYC_PORTABLE.replace("REPACK = 1", "AMX_INT8 = 0"))


def test_buffer_names_are_read_from_the_load_log() -> None:
    lines = [
        "load_tensors:   CPU_Mapped model buffer size =   270.00 MiB",
        "load_tensors:          AMX model buffer size =    20.00 MiB",
        "llama_context: n_ctx = 4096",
    ]
    assert buffer_types(lines) == ["CPU_Mapped", "AMX"]


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_no_weight_of_a_quantised_model_is_placed_in_an_amx_buffer(
    tiny_models: dict[str, Path], tmp_path: Path, quant: str
) -> None:
    from artifacts.llamacpp import system_info
    from inference.engine.loader import load_model
    from tests.inference.test_engine import llamacpp_options

    model = load_model(
        "tiny",
        tiny_models["tiny-llama"],
        backend_setting="llamacpp",
        quant_setting=quant,
        llamacpp=llamacpp_options(tmp_path),
    )
    decoder = model.decoder
    try:
        assert decoder.buffer_types, "the load log names the buffers"  # type: ignore[attr-defined]
        assert not any("AMX" in name for name in decoder.buffer_types)  # type: ignore[attr-defined]
        assert not amx_compiled_in(system_info()), "this install builds llama.cpp without AMX"
    finally:
        decoder.close()  # type: ignore[attr-defined]
