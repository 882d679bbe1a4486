"""Cores for vLLM servers on one CPU host: each server gets the cores fewest live servers hold, through lease files
that another process (another inference replica) sees, and a dead service's leases count for nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from inference.vllm.cores import cores_per_server, one_rank, take_cores


def test_servers_on_two_cores_take_one_each_and_share_only_when_there_are_more_servers(tmp_path: Path) -> None:
    first = take_cores("8001", threads=2, folder=tmp_path, allowed=[0, 1])
    second = take_cores("8002", threads=2, folder=tmp_path, allowed=[0, 1])
    third = take_cores("8003", threads=2, folder=tmp_path, allowed=[0, 1])
    assert (first.cores, second.cores, third.cores) == ((0,), (1,), (0,))
    assert second.bind == "1"
    first.release()
    third.release()
    assert take_cores("8004", threads=2, folder=tmp_path, allowed=[0, 1]).cores == (0,)


def test_a_server_on_many_cores_takes_the_least_held_ones(tmp_path: Path) -> None:
    allowed = list(range(8))
    first = take_cores("8001", threads=4, folder=tmp_path, allowed=allowed)
    second = take_cores("8002", threads=4, folder=tmp_path, allowed=allowed)
    assert first.cores == (0, 1, 2, 3)
    assert second.cores == (4, 5, 6, 7)
    assert first.bind == "0,1,2,3"
    assert take_cores("8003", threads=0, folder=tmp_path, allowed=allowed).cores == (0, 1, 2, 3, 4, 5, 6)


def test_a_lease_of_a_service_that_died_counts_for_nothing(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (tmp_path / f"{dead_pid}-8001.json").write_text(json.dumps({"pid": dead_pid, "cores": [0]}))
    assert take_cores("8002", threads=1, folder=tmp_path, allowed=[0, 1]).cores == (0,)
    assert not (tmp_path / f"{dead_pid}-8001.json").exists()


def test_one_core_is_left_to_the_service_unless_the_host_has_only_one() -> None:
    assert cores_per_server(threads=0, allowed=2) == 1
    assert cores_per_server(threads=8, allowed=4) == 3
    assert cores_per_server(threads=2, allowed=16) == 2
    assert cores_per_server(threads=0, allowed=1) == 1


def test_a_server_of_several_ranks_is_left_to_vllms_own_binding() -> None:
    assert one_rank([]) and one_rank(["--enforce-eager"]) and one_rank(["--tensor-parallel-size", "1"])
    assert not one_rank(["--tensor-parallel-size", "2"])
    assert not one_rank(["--enforce-eager", "-tp=2"])
    assert not one_rank(["--data-parallel-size=4"])
