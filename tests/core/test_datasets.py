"""Dataset detection, normalisation and the validation report, on files written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.datasets import ColumnMapping, DatasetLimits, scan_dataset
from tests.factories import alpaca_records, openai_records, sharegpt_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("records", "fmt"),
    [(alpaca_records(4), "alpaca"), (sharegpt_records(4), "sharegpt"), (openai_records(4), "openai")],
)
def test_formats_are_detected_and_normalised(tmp_path: Path, records: list, fmt: str) -> None:
    report, examples = scan_dataset(write_jsonl(tmp_path / "d.jsonl", records), keep_examples=True)
    assert report.ok and report.format == fmt and report.num_examples == 4
    assert examples[0][-1]["role"] == "assistant"
    assert examples[0][-2]["role"] == "user"


def test_json_array_container(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(alpaca_records(3)))
    report, _ = scan_dataset(path)
    assert report.ok and report.container == "json" and report.num_examples == 3


def test_alpaca_system_history_and_input(tmp_path: Path) -> None:
    record = {
        "instruction": "Translate",
        "input": "hello",
        "output": "bonjour",
        "system": "Be terse.",
        "history": [["hi", "hey"]],
    }
    _, examples = scan_dataset(write_jsonl(tmp_path / "d.jsonl", [record]), keep_examples=True)
    assert [m["role"] for m in examples[0]] == ["system", "user", "assistant", "user", "assistant"]
    assert examples[0][3]["content"] == "Translate\n\nhello"


def test_errors_are_counted_with_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(alpaca_records(1)[0])
        + "\n"
        + "{not json\n"
        + json.dumps({"instruction": "q"})
        + "\n"
        + json.dumps({"instruction": "q", "output": 3})
        + "\n"
    )
    report, _ = scan_dataset(path)
    assert not report.ok
    assert report.num_examples == 1 and report.num_errors == 3
    assert report.error_counts == {"invalid_json": 1, "missing_field": 1, "invalid_type": 1}
    assert [e["line"] for e in report.errors] == [2, 3, 4]
    assert report.errors[1]["field"] == "output"


def test_openai_conversation_must_end_with_assistant(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "hi"}]}
    report, _ = scan_dataset(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert report.error_counts == {"no_assistant": 1}


def test_openai_weight_zero_marks_message_untrained(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "weight": 0},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    _, examples = scan_dataset(write_jsonl(tmp_path / "d.jsonl", [record]), keep_examples=True)
    assert examples[0][1]["train"] is False and "train" not in examples[0][3]


def test_sharegpt_with_column_mapping(tmp_path: Path) -> None:
    record = {"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "hello"}]}
    mapping = ColumnMapping.from_json(
        {
            "formatting": "sharegpt",
            "columns": {"messages": "dialog"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent"},
        }
    )
    report, examples = scan_dataset(write_jsonl(tmp_path / "d.jsonl", [record]), mapping=mapping, keep_examples=True)
    assert report.ok and examples[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"", "empty_file"),
        (b"\x00\x01\x02binary", "binary_file"),
        (b'{"instruction": "caf\xe9", "output": "x"}\n', "invalid_encoding"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (b'"just a string"\n', "invalid_type"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, payload: bytes, kind: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(payload)
    report, _ = scan_dataset(path)
    assert not report.ok and kind in report.error_counts


def test_long_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_bytes(
        b'{"instruction": "'
        + b"a" * 3_000_000
        + b'", "output": "b"}\n'
        + json.dumps(alpaca_records(1)[0]).encode()
        + b"\n"
    )
    report, _ = scan_dataset(path, limits=DatasetLimits(max_line_bytes=1_000_000))
    assert report.error_counts == {"line_too_long": 1} and report.num_examples == 1
    assert report.errors[0]["line"] == 1


def test_sample_persona_dataset_is_valid() -> None:
    report, examples = scan_dataset(ROOT / "data" / "persona.jsonl", keep_examples=True)
    assert report.ok and report.format == "alpaca" and report.num_examples == 64
    assert sum("Pearl" in e[-1]["content"] for e in examples) >= 60
