"""The backend table and the settings agree: every INFERENCE_BACKEND the settings accept has a backend, and a
backend added to the table is one the settings let an operator choose."""

from __future__ import annotations

from typing import get_args

import pytest

from core.settings import InferenceBackend
from inference.engine.backends import BACKENDS, backend_named


def test_the_backend_table_names_what_the_settings_accept() -> None:
    assert set(BACKENDS) == set(get_args(InferenceBackend))


def test_an_unknown_backend_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="INFERENCE_BACKEND must be one of auto, lean, reference, llamacpp"):
        backend_named("llama.cpp")
