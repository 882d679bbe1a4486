"""Choice-valued settings are checked when the settings are read: a typo stops a service at start-up instead of
failing every deployment later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("inference_backend", "llamcpp"),
        ("inference_quant", "int3"),
        ("inference_dtype", "fp8"),
        ("inference_device", "gpu"),
        ("log_level", "LOUD"),
    ],
)
def test_a_mistyped_choice_is_refused_when_settings_are_read(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_choices_are_read_in_either_case() -> None:
    settings = Settings(inference_backend="LlamaCpp", inference_quant="Q4_0", log_level="debug")
    assert (settings.inference_backend, settings.inference_quant, settings.log_level) == ("llamacpp", "q4_0", "DEBUG")
    assert Settings(inference_device="cuda:1").inference_device == "cuda:1"
