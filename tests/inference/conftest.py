"""Fixtures of the inference tests: a second and a third "fine-tuned" model (tiny Llamas with other weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "ft-one", "llama", seed=1)


@pytest.fixture(scope="session")
def finetuned_two(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "ft-two", "llama", seed=2)
