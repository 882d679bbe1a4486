"""The launcher's supervision of a job's ranks, against a real child process standing in for ``accelerate launch``:
a launcher that never exits after every rank wrote its outcome (a rank stuck leaving its process group) is ended,
and the job takes the ranks' written outcome."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from core.db import get_sessionmaker
from worker import launch
from worker.heartbeat import JobControl

# Writes each rank's outcome as the ranks do, then blocks as a rank stuck in destroy_process_group would.
STUCK_AFTER_OUTCOMES = """
import json, pathlib, sys, time
folder = pathlib.Path(sys.argv[1])
for rank in range(int(sys.argv[2])):
    (folder / f"outcome-rank{rank}.json").write_text(json.dumps({"outcome": "succeeded"}))
time.sleep(3600)
"""


def _control() -> JobControl:
    return JobControl(
        uuid.uuid4(), "test-owner", lease_seconds=60, interval_seconds=5, session_factory=get_sessionmaker()
    )


def test_a_launcher_stuck_after_every_outcome_is_ended_and_the_outcome_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "EXIT_AFTER_OUTCOMES_SECONDS", 1.0)
    process = subprocess.Popen([sys.executable, "-c", STUCK_AFTER_OUTCOMES, str(tmp_path), "2"])
    try:
        started = time.monotonic()
        launch._supervise(process, _control(), tmp_path, devices=2)
        assert process.poll() is None, "the stand-in launcher was meant to be still running"
        assert time.monotonic() - started < 60
        launch._end_launcher(process, grace=5)
        assert process.returncode is not None
    finally:
        if process.poll() is None:
            process.kill()
    outcomes = launch._read_outcomes(tmp_path)
    assert outcomes == {0: {"outcome": "succeeded"}, 1: {"outcome": "succeeded"}}
    launch._raise_outcome(tmp_path, outcomes, process.returncode, _control(), devices=2)  # succeeded: nothing raised


def test_a_launcher_is_not_ended_while_a_rank_has_not_written_its_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "EXIT_AFTER_OUTCOMES_SECONDS", 0.2)
    # One of two ranks wrote its outcome; the launcher then exits on its own after 3 s.
    script = STUCK_AFTER_OUTCOMES.replace("time.sleep(3600)", "time.sleep(3)")
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "1"])
    try:
        launch._supervise(process, _control(), tmp_path, devices=2)
        assert process.returncode == 0, "supervision returned before the launcher ended"
    finally:
        if process.poll() is None:
            process.kill()
    assert json.loads((tmp_path / "outcome-rank0.json").read_text()) == {"outcome": "succeeded"}


def _ranks_wrote(folder: Path, started: list[int], outcomes: dict[int, dict[str, object]]) -> dict[int, dict]:
    for rank in started:
        launch.started_file(folder, rank).touch()
    for rank, outcome in outcomes.items():
        launch.outcome_file(folder, rank).write_text(json.dumps(outcome))
    return launch._read_outcomes(folder)


PEER_GONE = {"outcome": "crashed", "kind": "DistBackendError", "out_of_memory": False, "peer_lost": True}


def test_a_rank_that_started_and_said_nothing_while_its_peer_only_lost_it_was_lost(tmp_path: Path) -> None:
    outcomes = _ranks_wrote(tmp_path, [0, 1], {0: PEER_GONE})
    with pytest.raises(launch.RanksCrashed) as crash:
        launch._raise_outcome(tmp_path, outcomes, 1, _control(), devices=2)
    assert crash.value.rank_lost and crash.value.kind == "training process 1 ended abruptly"


def test_ranks_that_all_said_nothing_are_all_named(tmp_path: Path) -> None:
    outcomes = _ranks_wrote(tmp_path, [0, 1], {})
    with pytest.raises(launch.RanksCrashed) as crash:
        launch._raise_outcome(tmp_path, outcomes, 1, _control(), devices=2)
    assert crash.value.rank_lost and crash.value.kind == "training processes 0 and 1 ended abruptly"


@pytest.mark.parametrize(
    ("started", "outcomes", "kind"),
    [
        # A rank's own error is the cause; its silent peer was stopped by the launcher after it.
        ([0, 1], {0: {"outcome": "crashed", "kind": "ValueError", "peer_lost": False}}, "ValueError"),
        # No rank got as far as its process group: the launcher itself failed.
        ([], {}, "exit status 1"),
    ],
    ids=["a-rank-raised", "nothing-started"],
)
def test_a_crash_with_a_cause_of_its_own_is_not_a_lost_rank(
    tmp_path: Path, started: list[int], outcomes: dict[int, dict[str, object]], kind: str
) -> None:
    read = _ranks_wrote(tmp_path, started, outcomes)
    with pytest.raises(launch.RanksCrashed) as crash:
        launch._raise_outcome(tmp_path, read, 1, _control(), devices=2)
    assert not crash.value.rank_lost and kind in crash.value.kind
