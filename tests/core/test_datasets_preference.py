"""Preference (DPO) files: OpenAI's format and LLaMA-Factory's Alpaca and ShareGPT ranking formats, detected,
normalised to the same pairs, and refused line by line when malformed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.datasets import (
    ColumnMapping,
    PreferencePair,
    load_conversations,
    load_preference_pairs,
    scan_dataset,
)
from tests.factories import alpaca_records, write_jsonl
from tests.preference_records import (
    PAIRS,
    alpaca_preference_records,
    openai_preference_records,
    sharegpt_preference_records,
)

BUILDERS = {
    "openai_preference": openai_preference_records,
    "alpaca_preference": alpaca_preference_records,
    "sharegpt_preference": sharegpt_preference_records,
}


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_each_preference_format_is_detected_and_normalised_to_the_same_pairs(tmp_path: Path, fmt: str) -> None:
    report, pairs = scan_dataset(write_jsonl(tmp_path / "d.jsonl", BUILDERS[fmt](4)), keep_examples=True)
    assert report.ok and report.format == fmt and report.num_examples == 4
    assert report.to_json()["kind"] == "preference"
    assert pairs == [PreferencePair([{"role": "user", "content": q}], good, bad) for q, good, bad in PAIRS]
    assert pairs[0].conversation()[-1] == {"role": "assistant", "content": PAIRS[0][1]}
    assert pairs[0].conversation(preferred=False)[-1]["content"] == PAIRS[0][2]


def test_supervised_files_say_so(tmp_path: Path) -> None:
    report, _ = scan_dataset(write_jsonl(tmp_path / "d.jsonl", alpaca_records(2)))
    assert report.ok and report.to_json()["kind"] == "supervised"


def test_multi_turn_prompts_and_system_messages(tmp_path: Path) -> None:
    records = [
        {
            "input": {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": [{"type": "text", "text": "name?"}]},
                ]
            },
            "preferred_output": [{"role": "assistant", "content": "Shellby."}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        },
        {
            "instruction": "Translate",
            "input": "hello",
            "system": "Be terse.",
            "history": [["hi", "hey"]],
            "chosen": "bonjour",
            "rejected": "no",
        },
        {
            "system": "Be kind.",
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "name?"},
            ],
            "chosen": {"from": "gpt", "value": "Shellby."},
            "rejected": {"from": "gpt", "value": "No."},
        },
    ]
    roles = []
    for i, record in enumerate(records):
        report, pairs = scan_dataset(write_jsonl(tmp_path / f"{i}.jsonl", [record]), keep_examples=True)
        assert report.ok, report.errors
        roles.append([m["role"] for m in pairs[0].prompt])
    assert roles == [
        ["system", "user", "assistant", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user", "assistant", "user"],
    ]


def _bad_lines(good: dict[str, Any], bad: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    path = write_jsonl(tmp_path / "d.jsonl", [good, *bad])
    report, _ = scan_dataset(path)
    assert not report.ok and report.num_examples == 1 and report.num_errors == len(bad)
    return report.errors


def test_openai_preference_bad_lines_are_reported_with_line_and_field(tmp_path: Path) -> None:
    good = openai_preference_records(1)[0]
    bad = [
        {**good, "input": "hi"},
        {**good, "input": {"messages": []}},
        {**good, "input": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}},
        {**good, "preferred_output": []},
        {**good, "preferred_output": [{"role": "user", "content": "x"}]},
        {**good, "non_preferred_output": [{"role": "assistant", "content": 3}]},
        {**good, "preferred_output": [{"role": "assistant", "content": "  "}]},
    ]
    errors = _bad_lines(good, bad, tmp_path)
    assert [(e["line"], e["kind"], e["field"]) for e in errors] == [
        (2, "missing_field", "input"),
        (3, "missing_field", "input.messages"),
        (4, "no_prompt", "input.messages"),
        (5, "missing_field", "preferred_output"),
        (6, "invalid_role", "preferred_output[0].role"),
        (7, "invalid_type", "non_preferred_output[0].content"),
        (8, "empty_field", "preferred_output[0].content"),
    ]


def test_alpaca_preference_bad_lines_are_reported_with_line_and_field(tmp_path: Path) -> None:
    good = alpaca_preference_records(1)[0]
    bad = [
        {k: v for k, v in good.items() if k != "rejected"},
        {**good, "chosen": 3},
        {**good, "chosen": ""},
        {**good, "instruction": ""},
    ]
    errors = _bad_lines(good, bad, tmp_path)
    assert [(e["line"], e["kind"], e["field"]) for e in errors] == [
        (2, "missing_field", "rejected"),
        (3, "invalid_type", "chosen"),
        (4, "empty_field", "chosen"),
        (5, "empty_field", "instruction"),
    ]


def test_sharegpt_preference_bad_lines_are_reported_with_line_and_field(tmp_path: Path) -> None:
    good = sharegpt_preference_records(1)[0]
    bad = [
        {**good, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {**good, "chosen": "a string"},
        {**good, "rejected": {"from": "human", "value": "x"}},
        {**good, "chosen": {"from": "robot", "value": "x"}},
        {k: v for k, v in good.items() if k != "chosen"} | {"rejected": good["rejected"]},
    ]
    errors = _bad_lines(good, bad, tmp_path)
    assert [(e["line"], e["kind"], e["field"]) for e in errors] == [
        (2, "no_prompt", "conversations"),
        (3, "invalid_type", "chosen"),
        (4, "invalid_role", "rejected.from"),
        (5, "invalid_role", "chosen.from"),
        (6, "missing_field", "chosen"),
    ]


def test_a_supervised_line_in_a_preference_file_is_an_error_on_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*openai_preference_records(2), alpaca_records(1)[0]])
    report, _ = scan_dataset(path)
    assert report.format == "openai_preference" and report.num_examples == 2
    assert report.errors[0]["line"] == 3 and report.errors[0]["field"] == "input"


def test_json_array_errors_carry_the_index(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([*alpaca_preference_records(2), {"instruction": "q", "chosen": "a"}]))
    report, _ = scan_dataset(path)
    assert report.errors == [
        {"index": 2, "kind": "missing_field", "message": "'rejected' is required", "field": "rejected"}
    ]


def test_llamafactory_ranking_mapping_names_the_columns(tmp_path: Path) -> None:
    records = [{"question": q, "better": good, "worse": bad} for q, good, bad in PAIRS]
    mapping = ColumnMapping.from_json(
        {
            "formatting": "alpaca",
            "ranking": True,
            "columns": {"prompt": "question", "chosen": "better", "rejected": "worse"},
        }
    )
    report, pairs = scan_dataset(write_jsonl(tmp_path / "d.jsonl", records), mapping=mapping, keep_examples=True)
    assert report.ok and report.format == "alpaca_preference"
    assert pairs[0] == PreferencePair([{"role": "user", "content": PAIRS[0][0]}], PAIRS[0][1], PAIRS[0][2])


def test_loaders_refuse_the_other_kind(tmp_path: Path) -> None:
    preference = write_jsonl(tmp_path / "p.jsonl", openai_preference_records(2))
    supervised = write_jsonl(tmp_path / "s.jsonl", alpaca_records(2))
    assert len(load_preference_pairs(preference, "openai_preference")) == 2
    with pytest.raises(ValueError, match="preference pairs"):
        load_conversations(preference, "openai_preference")
    with pytest.raises(ValueError, match="conversations"):
        load_preference_pairs(supervised, "alpaca")
