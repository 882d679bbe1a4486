"""The CPU cores each vLLM server on this host computes on.

vLLM's CPU build binds a server's OpenMP threads by itself (``VLLM_CPU_OMP_THREADS_BIND=auto``): the first cores of
the first NUMA node, keeping one free for the other processes. It knows of no other server, so every server Conch
starts on one host (a base model's, a merged fine-tune's next to it in a blue/green swap, another replica's) binds
the same cores. On a 2-core host a second server's start then stalled for over 600 s behind the first, busy one.

So Conch hands the cores out: a server takes the cores that the fewest live servers on this host hold and gives
vLLM that explicit list. Leases are files in one folder per user (``fcntl`` locked), so inference replicas on one
host see each other's servers; a lease whose service process is gone counts for nothing. An operator's own
``VLLM_CPU_OMP_THREADS_BIND`` (a list, ``auto`` or ``nobind``) is left alone, and so is a server of several ranks
(a parallel size above 1 in ``VLLM_EXTRA_ARGS``). On GPUs vLLM ignores the variable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.hostload import process_alive

BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"
# Flags that give one server several ranks: vLLM then wants one core list per rank ("0-3|4-7"), so Conch leaves the
# binding to vLLM rather than hand it a single list.
_RANK_FLAGS = ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp")


def lease_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"conch-vllm-cores-{os.getuid()}"


def allowed_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cores_per_server(threads: int, allowed: int) -> int:
    """``threads`` cores (all but one when unset), always leaving one core of the host to the service itself and
    vLLM's own front-end process, as vLLM's automatic binding does."""
    most = max(1, allowed - 1)
    return min(threads, most) if threads > 0 else most


def one_rank(server_args: tuple[str, ...] | list[str]) -> bool:
    """Whether a server started with ``server_args`` (VLLM_EXTRA_ARGS) runs as a single rank."""
    for index, arg in enumerate(server_args):
        name, _, inline = arg.partition("=")
        if name in _RANK_FLAGS:
            value = inline or (server_args[index + 1] if index + 1 < len(server_args) else "1")
            if value.strip() not in ("", "1"):
                return False
    return True


@dataclass(frozen=True)
class CoreLease:
    path: Path
    cores: tuple[int, ...]

    @property
    def bind(self) -> str:
        """The value of ``VLLM_CPU_OMP_THREADS_BIND`` for one server with one rank: ``"3,4"``."""
        return ",".join(str(core) for core in self.cores)

    def release(self) -> None:
        with _locked(self.path.parent):
            self.path.unlink(missing_ok=True)


def take_cores(owner: str, threads: int, folder: Path | None = None, allowed: list[int] | None = None) -> CoreLease:
    """Lease the cores fewest live servers hold (lowest ids first among equals) for the server ``owner`` names
    (unique on this host, e.g. its port)."""
    folder = folder or lease_folder()
    allowed = allowed or allowed_cores()
    count = cores_per_server(threads, len(allowed))
    with _locked(folder):
        held = Counter(core for lease in _live_leases(folder) for core in lease)
        chosen = tuple(sorted(sorted(allowed, key=lambda core: (held[core], core))[:count]))
        path = folder / f"{os.getpid()}-{owner}.json"
        path.write_text(json.dumps({"pid": os.getpid(), "cores": list(chosen)}))
    return CoreLease(path, chosen)


def _live_leases(folder: Path) -> Iterator[list[int]]:
    for path in folder.glob("*.json"):
        try:
            lease = json.loads(path.read_text())
            alive = process_alive(int(lease["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive:
            yield [int(core) for core in lease["cores"]]
        else:  # its service died without releasing it
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
