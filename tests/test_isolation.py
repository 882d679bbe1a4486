"""The ``native`` marker (tests/isolation.py): a segfault in a marked test fails that test, not the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

INNER = """
import ctypes
import os

import pytest


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_unmarked():
    assert not os.environ.get("CONCH_NATIVE_CHILD")  # it ran in the main process


@pytest.mark.native
def test_crashes():
    ctypes.string_at(0)


@pytest.mark.native
def test_passes_after_the_crash():
    assert os.environ.get("CONCH_NATIVE_CHILD")  # it ran in a child


@pytest.mark.native
def test_fails():
    assert 1 == 2, "an ordinary failure"


@pytest.mark.native
def test_setup_error(broken):
    pass


@pytest.mark.native
def test_skips():
    pytest.skip("nothing to do here")
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini("[pytest]\naddopts = --strict-markers -ra\nmarkers =\n    native: runs in a child process\n")
    # Another module after it: what the main process set up for test_inner.py is torn down before it runs.
    pytester.makepyfile(test_inner=INNER, test_other="def test_other():\n    pass\n")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the inner run loads the plugin with -p tests.isolation
    monkeypatch.delenv("CONCH_NATIVE_CHILD", raising=False)
    return pytester


def test_a_crash_fails_only_its_test_and_the_others_report_their_own_outcome(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "tests.isolation", timeout=300)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # not 139
    result.assert_outcomes(passed=3, failed=2, skipped=1, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*native crash: the child process died with SIGSEGV while running test_inner.py::test_crashes;*",
            "*Fatal Python error: Segmentation fault*",  # the tail of the child's stderr
            "FAILED test_inner.py::test_crashes - native crash:*",
            "FAILED test_inner.py::test_fails - AssertionError: an ordinary failure*",
            "ERROR test_inner.py::test_setup_error - RuntimeError: fixture broke",
            "SKIPPED [[]1[]] test_inner.py:*: nothing to do here",
        ]
    )


def test_exitfirst_stops_at_the_crash(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "tests.isolation", "-x", timeout=300)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=1)


def test_keyword_selection_reaches_the_child(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "tests.isolation", "-k", "passes or unmarked", timeout=300)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2)
