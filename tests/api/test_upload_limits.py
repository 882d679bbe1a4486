"""Dataset limits: a JSON array above MAX_JSON_ARRAY_BYTES is refused with 413 (it would be parsed whole), an
example nested deeper than MAX_JSON_DEPTH is refused naming its line, and the worker re-reads a file under the same
settings-driven limits as the upload, not a number of its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.datasets import load_conversations
from core.orm import FileObject
from tests.api.conftest import UploadFn
from tests.api.helpers import assert_envelope, count_rows, make_client, settings_env
from tests.factories import alpaca_records, jsonl


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"inner": value}
    return value


def test_json_array_above_its_cap_is_413_naming_file_and_nothing_kept(
    clean_db: None, upload: UploadFn, files_dir: Path
) -> None:
    records = alpaca_records(40)
    array = json.dumps(records).encode()
    assert len(array) > 2048
    before = sorted(p.name for p in files_dir.iterdir())
    with make_client(MAX_JSON_ARRAY_BYTES="2048") as small:
        error = assert_envelope(upload(array, filename="train.json", via=small), 413, param="file")
        assert "JSONL" in error["message"] and "2048" in error["message"]
        assert count_rows(FileObject) == 0
        assert sorted(p.name for p in files_dir.iterdir()) == before
        # The same examples as JSONL are read line by line and are not held to the array cap.
        accepted = upload(jsonl(records), via=small)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["num_examples"] == 40


def test_json_array_under_its_cap_is_accepted(client: TestClient, upload: UploadFn) -> None:
    response = upload(json.dumps(alpaca_records(3)).encode(), filename="train.json")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_example_nested_deeper_than_max_json_depth_is_refused_naming_it(
    clean_db: None, upload: UploadFn, container: str
) -> None:
    records = alpaca_records(3)
    records[1]["metadata"] = _nested(20)  # extra fields are otherwise ignored, so only the depth check refuses it
    with make_client(MAX_JSON_DEPTH="10") as shallow:
        if container == "jsonl":
            response = upload(jsonl(records), via=shallow)
            where = "line 2"
        else:
            response = upload(json.dumps(records).encode(), filename="train.json", via=shallow)
            where = "index 1"
        error = assert_envelope(response, 400, code="invalid_file")
        assert where in error["message"] and "deeper than 10" in error["message"], error
        assert count_rows(FileObject) == 0
        # Within the limit the same file is accepted.
        records[1]["metadata"] = _nested(5)
        assert upload(jsonl(records), via=shallow).status_code == 200


def test_worker_reads_under_the_settings_limits(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    records = alpaca_records(2)
    records[0]["output"] = "x" * 5000
    path.write_bytes(jsonl(records))
    assert len(load_conversations(path, "alpaca")) == 2
    with settings_env(MAX_LINE_BYTES="4096"), pytest.raises(ValueError, match="line_too_long"):
        load_conversations(path, "alpaca")
    records[0]["output"] = "short"
    records[1]["metadata"] = _nested(20)
    path.write_bytes(jsonl(records))
    with settings_env(MAX_JSON_DEPTH="10"), pytest.raises(ValueError, match="too_deep"):
        load_conversations(path, "alpaca")
