"""Server paths leave client-facing text as their last component; URLs, routes and model ids stay as they are."""

from __future__ import annotations

import pytest

from core.redact import hide_paths


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("model folder /srv/conch/var/models/ft-x does not exist", "model folder ft-x does not exist"),
        ("/srv/x/config.json is unreadable: bad", "config.json is unreadable: bad"),
        ("No such file or directory: '/tmp/a/b/c.gguf'", "No such file or directory: 'c.gguf'"),
        ("cannot load var/artifacts/models/m1: OSError", "cannot load m1: OSError"),
        ("a folder /tmp/x/ here", "a folder x here"),
        ("C:\\models\\x\\w.bin is missing", "w.bin is missing"),
        ("see http://host:8000/v1/models", "see http://host:8000/v1/models"),
        ("HuggingFaceTB/SmolLM2-135M and q4_0/q8_0", "HuggingFaceTB/SmolLM2-135M and q4_0/q8_0"),
        ("ft:SmolLM2-135M-Instruct:acme:ftjob-1", "ft:SmolLM2-135M-Instruct:acme:ftjob-1"),
    ],
)
def test_hide_paths(text: str, shown: str) -> None:
    assert hide_paths(text) == shown
