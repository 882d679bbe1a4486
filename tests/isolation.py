"""Tests marked ``native`` run in a child pytest process, so a crash in native code fails only that test.

A segfault inside llama.cpp would otherwise end the whole run (exit 139). The parent runs the marked items of
one module in one ``python -m pytest`` child (imports and session fixtures paid once per module), which writes one
JSON line per event to the file named by ``CONCH_NATIVE_CHILD``; the parent replays each item's reports, so
``-ra``, ``-x``, durations and the summary read as usual. When the child dies (a signal) in the middle of an item,
that item fails with the tail of the child's stderr, and the module's remaining marked items run in a fresh child.
Inside the child (``CONCH_NATIVE_CHILD`` set) the marker does nothing. ``--pdb`` and ``--trace`` run marked tests
in-process, as does ``-p no:tests.isolation``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest

MARKER = "native"
CHILD_ENV = "CONCH_NATIVE_CHILD"
OUTPUT_LINES = 40
# The folder that makes this module importable by its name (the repository root for ``tests.isolation``).
IMPORT_ROOT = Path(__file__).resolve().parents[len(__name__.split(".")) - 1]


def is_native(item: pytest.Item) -> bool:
    return item.get_closest_marker(MARKER) is not None


@dataclass
class ChildRun:
    """What one child reported: each item's reports, and which items started and finished."""

    reports: dict[str, list[pytest.TestReport]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""

    def death(self) -> str:
        if self.returncode < 0:
            try:
                return f"died with {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"died with signal {-self.returncode}"
        return f"exited with code {self.returncode}"


class ChildReporter:
    """Child side: one JSON line per test start, report and finish, flushed at once so a crash loses none."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config = config
        self.out: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed at unconfigure)

    def _write(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._write({"event": "start", "nodeid": nodeid})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self._write({"event": "report", "nodeid": report.nodeid, "report": data})

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._write({"event": "finish", "nodeid": nodeid})

    def pytest_unconfigure(self) -> None:
        self.out.close()


class Isolator:
    """Parent side: runs each module's marked items in a child before their turn comes (outside other plugins'
    per-test timers, as a tryfirst wrapper) and keeps what it reported, for ``Replayer`` to report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.done: dict[str, list[pytest.TestReport]] = {}

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        if is_native(item) and item.nodeid not in self.done:
            self.run_group(item)
        return (yield)

    def run_group(self, item: pytest.Item) -> None:
        """Runs, in one child, every selected marked item of this item's module that has no result yet; after a
        crash, the items the child never started run in a fresh one, until this item has its result."""
        while item.nodeid not in self.done:
            group = [
                i for i in item.session.items if is_native(i) and i.path == item.path and i.nodeid not in self.done
            ]
            ids = [i.nodeid for i in group]
            run = self.run_child(ids)
            crashed = next((n for n in run.started if n in ids and n not in run.finished), None)
            for member in group:
                nodeid, earlier = member.nodeid, run.reports.get(member.nodeid, [])
                if nodeid in run.finished:
                    self.done[nodeid] = earlier
                elif nodeid == crashed:
                    message = (
                        f"native crash: the child process {run.death()} while running {nodeid}; the rest of the "
                        f"suite went on.\n--- the child's stderr ---\n{crash_excerpt(run.stderr)}"
                    )
                    self.done[nodeid] = [*earlier, failure(member, earlier, message)]
                elif crashed is None:
                    # The child ended, by itself or by a signal, outside any of these tests (a collection error, an
                    # unknown id, a crash at import): another child would do the same. Each pass ends some item.
                    output = "\n".join((run.stdout + run.stderr).splitlines()[-OUTPUT_LINES:])
                    message = f"the child process {run.death()} without running {nodeid}.\n--- its output ---\n{output}"
                    self.done[nodeid] = [failure(member, [], message)]

    def run_child(self, nodeids: list[str]) -> ChildRun:
        config = self.config
        with tempfile.TemporaryDirectory(prefix="pytest-native-", ignore_cleanup_errors=True) as tmp:
            events = Path(tmp) / "events.jsonl"
            events.touch()
            command = [sys.executable, "-m", "pytest", *nodeids, *child_options(config), f"--basetemp={tmp}/tmp"]
            env = {**os.environ, CHILD_ENV: str(events)}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(IMPORT_ROOT), env.get("PYTHONPATH")]))
            with open(Path(tmp) / "stdout", "w+b") as stdout, open(Path(tmp) / "stderr", "w+b") as stderr:
                returncode = subprocess.call(
                    command, cwd=config.rootpath, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
                )
                stdout.seek(0)
                stderr.seek(0)
                run = ChildRun(
                    returncode=returncode,
                    stdout=stdout.read().decode(errors="replace"),
                    stderr=stderr.read().decode(errors="replace"),
                )
            for line in events.read_text(encoding="utf-8").splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the crash
                    continue
                nodeid = event["nodeid"]
                if event["event"] == "start":
                    run.started.append(nodeid)
                elif event["event"] == "finish":
                    run.finished.add(nodeid)
                else:
                    data = event["report"]
                    if isinstance(data.get("longrepr"), list):  # a skip's (path, line, reason), a list in JSON
                        data["longrepr"] = tuple(data["longrepr"])
                    report = config.hook.pytest_report_from_serializable(config=config, data=data)
                    run.reports.setdefault(nodeid, []).append(report)
        return run


class Replayer:
    """Parent side: reports a marked item from its child's reports instead of running it here."""

    def __init__(self, isolator: Isolator) -> None:
        self.isolator = isolator

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        if not is_native(item):
            return None
        reports = self.isolator.done.pop(item.nodeid)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        teardown = [r for r in reports if r.when == "teardown"]
        for report in reports:
            if report.when != "teardown":
                ihook.pytest_runtest_logreport(report=report)
        # Fixtures this process set up for earlier unmarked items are torn down as their own protocol would;
        # an error there is this item's teardown report, as it would be without isolation.
        session = item.session
        if session.shouldfail or session.shouldstop:
            nextitem = None
        call = pytest.CallInfo.from_call(lambda: session._setupstate.teardown_exact(nextitem), when="teardown")
        if call.excinfo is not None:
            teardown = [ihook.pytest_runtest_makereport(item=item, call=call)]
        for report in teardown:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True


def crash_excerpt(stderr: str) -> str:
    """The end of the child's stderr; from a faulthandler dump, its top (the innermost frames) and what came
    just before it."""
    lines = stderr.splitlines()
    dump = max((n for n, line in enumerate(lines) if line.startswith("Fatal Python error")), default=None)
    if dump is None:
        return "\n".join(lines[-OUTPUT_LINES:])
    return "\n".join(lines[max(0, dump - 10) : dump + OUTPUT_LINES - 10])


def failure(item: pytest.Item, earlier: list[pytest.TestReport], message: str) -> pytest.TestReport:
    """A failed report for an item the child could not finish: its call, or its teardown if the call was seen."""
    seen = {r.when for r in earlier}
    return pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords=dict.fromkeys(item.keywords, 1),
        outcome="failed",
        longrepr=message,
        when="teardown" if "call" in seen else "call",
    )


def child_options(config: pytest.Config) -> list[str]:
    """The parent's options that change what a test does or how a failure reads."""
    option = config.option
    args = ["-p", "no:cacheprovider", "-p", __name__, f"--rootdir={config.rootpath}"]
    if config.inipath is not None:
        args.append(f"--config-file={config.inipath}")
    for name in option.plugins or []:
        args += ["-p", name]
    for override in option.override_ini or []:
        args += ["-o", override]
    for warning in option.pythonwarnings or []:
        args.append(f"-W{warning}")
    args += [f"--import-mode={option.importmode}", f"--tb={option.tbstyle}"]
    args += ["-v"] * max(0, option.verbose)
    if option.showlocals:
        args.append("--showlocals")
    if config.getoption("timeout", None) is not None:
        args.append(f"--timeout={config.getoption('timeout')}")
    return args


def pytest_configure(config: pytest.Config) -> None:
    child_events = os.environ.get(CHILD_ENV)
    if child_events:
        config.pluginmanager.register(ChildReporter(config, child_events), "native-child-reporter")
    elif not (config.getoption("usepdb", False) or config.getoption("trace", False)):
        isolator = Isolator(config)
        config.pluginmanager.register(isolator, "native-isolator")
        config.pluginmanager.register(Replayer(isolator), "native-replayer")
