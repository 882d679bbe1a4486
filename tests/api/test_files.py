"""/v1/files: valid uploads in every format, listing, content, deletion, and every kind of bad upload refused
with the error envelope and nothing kept (no row, no bytes, no temporary)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.orm import FileObject
from tests.api.conftest import UploadFn
from tests.api.helpers import assert_envelope, count_rows, dir_entries, make_client, multipart
from tests.factories import alpaca_records, jsonl, openai_records, sharegpt_records

# ------------------------------------------------------------------------------------------------ valid uploads


@pytest.mark.parametrize(
    ("records", "fmt", "messages_per_example"),
    [(alpaca_records(8), "alpaca", 2), (sharegpt_records(4), "sharegpt", 2), (openai_records(4), "openai", 3)],
)
def test_upload_detects_format_and_stores_under_generated_name(
    client: TestClient, upload: UploadFn, files_dir: Path, records: list[Any], fmt: str, messages_per_example: int
) -> None:
    content = jsonl(records)
    response = upload(content, filename="my data.jsonl")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["purpose"] == "fine-tune" and body["status"] == "processed"
    assert body["filename"] == "my data.jsonl"
    assert body["bytes"] == len(content)
    assert body["format"] == fmt
    assert body["num_examples"] == len(records)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["validation"]["num_errors"] == 0
    assert body["validation"]["num_messages"] == len(records) * messages_per_example
    assert isinstance(body["created_at"], int)

    stored = files_dir / f"{body['id'].removeprefix('file-')}.jsonl"
    assert stored.read_bytes() == content
    assert not [p for p in files_dir.iterdir() if p.name.startswith(".")]


def test_upload_json_array(client: TestClient, upload: UploadFn, files_dir: Path) -> None:
    content = json.dumps(alpaca_records(5)).encode()
    body = upload(content, filename="train.json").json()
    assert body["num_examples"] == 5 and body["validation"]["container"] == "json"
    assert (files_dir / f"{body['id'].removeprefix('file-')}.json").read_bytes() == content


def test_upload_with_column_mapping(client: TestClient, upload: UploadFn) -> None:
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    mapping = {"formatting": "alpaca", "columns": {"prompt": "question", "response": "answer"}}
    assert_envelope(upload(jsonl(records)), 400, code="invalid_file")

    response = upload(jsonl(records), column_mapping=json.dumps(mapping))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["format"] == "alpaca" and body["num_examples"] == 3
    assert body["validation"]["column_mapping"]["columns"] == mapping["columns"]


def test_explicit_format_is_enforced(client: TestClient, upload: UploadFn) -> None:
    error = assert_envelope(upload(jsonl(alpaca_records(2)), format="sharegpt"), 400, code="invalid_file")
    assert error["report"]["format"] == "sharegpt"
    assert upload(jsonl(alpaca_records(2)), format="alpaca").status_code == 200


def test_list_paginates_newest_first(client: TestClient, upload: UploadFn) -> None:
    ids = [upload(jsonl(alpaca_records(2)), filename=f"f{i}.jsonl").json()["id"] for i in range(3)]
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [f["id"] for f in page["data"]] == [ids[2], ids[1]]
    rest = client.get("/v1/files", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False
    oldest_first = client.get("/v1/files", params={"order": "asc"}).json()
    assert [f["id"] for f in oldest_first["data"]] == ids
    assert_envelope(client.get("/v1/files", params={"after": "file-" + "0" * 32}), 400, param="after")
    assert_envelope(client.get("/v1/files", params={"limit": 0}), 422, param="limit")


def test_retrieve_and_content(client: TestClient, upload: UploadFn) -> None:
    content = jsonl(openai_records(3))
    file_id = upload(content).json()["id"]
    assert client.get(f"/v1/files/{file_id}").json()["id"] == file_id
    response = client.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200 and response.content == content
    assert_envelope(client.get("/v1/files/file-" + "1" * 32), 404)
    assert_envelope(client.get("/v1/files/not-an-id"), 404)
    assert_envelope(client.get("/v1/files/not-an-id/content"), 404)


def test_delete_unused_file_removes_row_and_bytes(client: TestClient, upload: UploadFn, files_dir: Path) -> None:
    file_id = upload(jsonl(alpaca_records(2))).json()["id"]
    stored = files_dir / f"{file_id.removeprefix('file-')}.jsonl"
    assert stored.exists()
    response = client.delete(f"/v1/files/{file_id}")
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert not stored.exists()
    assert count_rows(FileObject) == 0
    assert_envelope(client.delete(f"/v1/files/{file_id}"), 404)


def test_delete_refused_while_a_live_job_uses_the_file(client: TestClient, training_file: str, files_dir: Path) -> None:
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file}).json()
    assert_envelope(client.delete(f"/v1/files/{training_file}"), 409)
    assert client.get(f"/v1/files/{training_file}").status_code == 200

    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/v1/files/{training_file}").json()["deleted"] is True
    # The finished job still names the file (lineage), but it is gone for the client and from disk.
    assert_envelope(client.get(f"/v1/files/{training_file}"), 404)
    assert_envelope(client.get(f"/v1/files/{training_file}/content"), 404)
    assert training_file not in [f["id"] for f in client.get("/v1/files").json()["data"]]
    assert not (files_dir / f"{training_file.removeprefix('file-')}.jsonl").exists()
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["training_file"] == training_file


# ------------------------------------------------------------------------------------------------ bad uploads


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_DATASETS: list[tuple[str, bytes, str, str | None]] = [
    # (case, content, report error kind, error.param)
    ("malformed_json", b'{"instruction": "hi", "output": "yo"}\n{"instruction": "x",\n', "invalid_json", "file"),
    ("wrong_type", jsonl([{"instruction": 42, "output": "x"}]), "invalid_type", "instruction"),
    ("missing_field", jsonl([{"instruction": "only a question"}]), "missing_field", "output"),
    ("empty_file", b"", "empty_file", "file"),
    ("whitespace_only", b"\n\n   \n", "empty_file", "file"),
    ("binary_file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary_file", "file"),
    ("nested_100k_jsonl", _nested(100_000) + b"\n", "too_deep", "file"),
    ("nested_100k_json_array", b"[" + _nested(100_000) + b"]", "too_deep", "file"),
    ("non_utf8", b'{"instruction": "caf\xe9", "output": "x"}\n', "invalid_encoding", "file"),
    ("not_objects", b"[1, 2, 3]", "invalid_type", "file"),
    ("unknown_format", jsonl([{"text": "plain text is not a supported format"}]), "unknown_format", "file"),
    ("bad_roles", jsonl([{"messages": [{"role": "robot", "content": "x"}]}]), "invalid_role", "messages[0].role"),
]


@pytest.mark.parametrize(("case", "content", "kind", "param"), BAD_DATASETS, ids=[c[0] for c in BAD_DATASETS])
def test_invalid_dataset_is_refused_and_nothing_kept(
    client: TestClient, upload: UploadFn, files_dir: Path, case: str, content: bytes, kind: str, param: str | None
) -> None:
    before = dir_entries(files_dir)
    error = assert_envelope(upload(content), 400, code="invalid_file", param=param)
    assert error["type"] == "invalid_request_error"
    report = error["report"]
    assert report["num_errors"] >= 1 and report["error_counts"].get(kind, 0) >= 1, report
    assert report["errors"][0]["kind"] == kind
    assert count_rows(FileObject) == 0
    assert dir_entries(files_dir) == before


def test_invalid_dataset_message_names_the_line(client: TestClient, upload: UploadFn) -> None:
    records: list[Any] = [*alpaca_records(3), {"instruction": "no answer"}, *alpaca_records(2), {"output": "x"}]
    error = assert_envelope(upload(jsonl(records)), 400, param="output")
    assert "line 4" in error["message"]
    assert error["report"]["num_examples"] == 5
    assert [e["line"] for e in error["report"]["errors"]] == [4, 7]
    assert error["report"]["error_counts"] == {"missing_field": 2}


def test_thirty_megabyte_line_is_refused(client: TestClient, upload: UploadFn, files_dir: Path) -> None:
    before = dir_entries(files_dir)
    line = json.dumps({"instruction": "x" * (30 * 1024 * 1024), "output": "y"}).encode() + b"\n"
    error = assert_envelope(upload(jsonl(alpaca_records(1)) + line), 400, code="invalid_file")
    assert error["report"]["errors"][0] == {
        "line": 2,
        "kind": "line_too_long",
        "message": error["report"]["errors"][0]["message"],
        "field": None,
    }
    assert count_rows(FileObject) == 0 and dir_entries(files_dir) == before


@pytest.mark.parametrize(
    "filename", ["../../etc/passwd.jsonl", "/abs/train.jsonl", "dir/train.jsonl", "..\\..\\x.jsonl", ".."]
)
def test_filename_with_path_components_is_refused(
    client: TestClient, upload: UploadFn, files_dir: Path, filename: str
) -> None:
    before = dir_entries(files_dir)
    assert_envelope(upload(jsonl(alpaca_records(2)), filename=filename), 400, param="file", code="invalid_filename")
    assert count_rows(FileObject) == 0 and dir_entries(files_dir) == before
    assert not (files_dir.parent / "etc").exists()


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"purpose": None}, 422, "purpose"),
        ({"purpose": "assistants"}, 422, "purpose"),
        ({"format": "csv"}, 422, "format"),
        ({"column_mapping": "{not json"}, 422, "column_mapping"),
        ({"column_mapping": '{"formatting": "yaml"}'}, 422, "column_mapping"),
        ({"column_mapping": "[" * 100_000 + "]" * 100_000}, 413, "column_mapping"),
        ({"column_mapping": "[" * 5_000 + "]" * 5_000}, 422, "column_mapping"),
        ({"status": "processed"}, 422, "status"),
        ({"id": "file-123"}, 422, "id"),
    ],
)
def test_bad_form_fields_are_refused(
    client: TestClient, upload: UploadFn, files_dir: Path, fields: dict[str, Any], status: int, param: str
) -> None:
    before = dir_entries(files_dir)
    purpose = fields.pop("purpose", "fine-tune")
    assert_envelope(upload(jsonl(alpaca_records(2)), purpose=purpose, **fields), status, param=param)
    assert count_rows(FileObject) == 0 and dir_entries(files_dir) == before


def test_missing_file_part_and_non_multipart_bodies(client: TestClient, files_dir: Path) -> None:
    before = dir_entries(files_dir)
    multipart_type = {"Content-Type": "multipart/form-data; boundary=conchtestboundary"}
    no_file = multipart({"purpose": "fine-tune"}, None)
    assert_envelope(client.post("/v1/files", content=no_file, headers=multipart_type), 422, param="file")
    assert_envelope(client.post("/v1/files", data={"purpose": "fine-tune"}), 400, code="invalid_content_type")
    assert_envelope(client.post("/v1/files", json={"purpose": "fine-tune"}), 400, code="invalid_content_type")
    assert_envelope(client.post("/v1/files", content=b"{bad json"), 400, code="invalid_content_type")
    broken = multipart({"purpose": "fine-tune"}, ("a.jsonl", jsonl(alpaca_records(2))))[:-30] + b"\r\n--wrong\x00\r\n"
    response = client.post(
        "/v1/files", content=broken, headers={"Content-Type": "multipart/form-data; boundary=conchtestboundary"}
    )
    assert 400 <= response.status_code < 500
    assert_envelope(response, response.status_code)
    two_files = multipart({"purpose": "fine-tune"}, ("a.jsonl", b"{}"))
    two_files = two_files.replace(b"--conchtestboundary--", multipart({}, ("b.jsonl", b"{}"))[:-2])
    response = client.post(
        "/v1/files", content=two_files, headers={"Content-Type": "multipart/form-data; boundary=conchtestboundary"}
    )
    assert_envelope(response, 422, param="file")
    assert count_rows(FileObject) == 0 and dir_entries(files_dir) == before


def test_oversize_upload_is_refused_with_413(clean_db: None, files_dir: Path) -> None:
    before = dir_entries(files_dir)
    with make_client(MAX_UPLOAD_BYTES="2000") as small:
        # Declared too large: refused from Content-Length before the body is read.
        big = jsonl(alpaca_records(4)) * 500
        response = small.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
        assert_envelope(response, 413, param="file")

        # Streamed without a Content-Length: refused as soon as the count passes the limit.
        body = multipart({"purpose": "fine-tune"}, ("big.jsonl", jsonl(alpaca_records(40))))
        chunks = (body[i : i + 1024] for i in range(0, len(body), 1024))
        response = small.post(
            "/v1/files", content=chunks, headers={"Content-Type": "multipart/form-data; boundary=conchtestboundary"}
        )
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_envelope(response, 413, param="file")

        # Under the limit, the same route works.
        assert (
            small.post(
                "/v1/files", files={"file": ("ok.jsonl", jsonl(alpaca_records(2)))}, data={"purpose": "fine-tune"}
            ).status_code
            == 200
        )
    assert count_rows(FileObject) == 1
    assert len(dir_entries(files_dir) - before) == 1


def test_streamed_upload_within_limit_is_accepted(client: TestClient, files_dir: Path) -> None:
    content = jsonl(alpaca_records(64))
    body = multipart({"purpose": "fine-tune", "format": "alpaca"}, ("stream.jsonl", content))
    chunks = (body[i : i + 777] for i in range(0, len(body), 777))
    response = client.post(
        "/v1/files", content=chunks, headers={"Content-Type": "multipart/form-data; boundary=conchtestboundary"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["sha256"] == hashlib.sha256(content).hexdigest()
    assert client.get(f"/v1/files/{response.json()['id']}/content").content == content
