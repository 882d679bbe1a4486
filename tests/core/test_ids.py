"""Public ids: one place spells each prefix, makes an id and reads one back; anything else reads as no id."""

from __future__ import annotations

import uuid

from core.ids import Prefix, event_id, parse_event_id, parse_public_id, public_id


def test_an_id_reads_back_as_the_key_it_was_made_from() -> None:
    key = uuid.uuid4()
    assert public_id(Prefix.JOB, key) == f"ftjob-{key.hex}"
    assert parse_public_id(public_id(Prefix.JOB, key), Prefix.JOB) == key
    assert parse_public_id(public_id(Prefix.FILE, key), Prefix.JOB) is None  # another kind's id
    for text in ("ftjob-", "ftjob-xyz", f"ftjob-{key.hex}0", None, 42):
        assert parse_public_id(text, Prefix.JOB) is None


def test_event_cursors_take_ascii_digits_that_fit_a_bigint() -> None:
    assert parse_event_id(event_id(17)) == 17
    # str.isdigit() accepts these, and int() of a 30-digit number overflows the column: both are no cursor.
    for text in ("ftevent-²", "ftevent-١٢", "ftevent-" + "9" * 30, "ftevent--1", "ftevent-", "17"):
        assert parse_event_id(text) is None
