"""One vLLM OpenAI server per base model: a child process in vLLM's own environment, supervised by Conch.

vLLM pins its own torch and transformers, so it runs from its own virtualenv (``scripts/vllm_env.sh``) as its
OpenAI server, the way it runs in production, and Conch talks to it over HTTP on a loopback port. The supervisor
starts it, waits for ``/health``, and restarts it with a growing back-off when it dies; after every start it loads
again the adapters registered with it, so an adapter survives a restart of the process (vLLM itself forgets every
adapter loaded at runtime). Requests that arrive while it restarts wait for it (``wait_healthy``).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from inference.vllm.cores import BIND_VARIABLE, CoreLease, one_rank, take_cores

log = logging.getLogger("conch.inference.vllm")

HEALTH_POLL_SECONDS = 0.5
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_SECONDS = 60.0  # a process up this long resets the back-off


# Run with vLLM's interpreter as the head of the server's process group: starts the server and, should the inference
# service die without stopping it (SIGKILL, OOM), stops the whole group, so no orphaned server keeps its memory and
# port. argv: the service's pid, then the server's arguments.
WATCHDOG = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
server = subprocess.Popen([sys.executable, *sys.argv[2:]])
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.monotonic()))
while server.poll() is None:
    if not stopping and os.getppid() != parent:
        os.killpg(0, signal.SIGTERM)
    if stopping and time.monotonic() - stopping[0] > 10:
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.5)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.killpg(0, signal.SIGTERM)  # the server's own workers, should it have left any
sys.exit(server.returncode)
"""


class VllmUnavailable(Exception):
    """The vLLM server is not running (not installed, failed to start, or stopped)."""


@dataclass(frozen=True)
class VllmOptions:
    """How every vLLM server of this service is started (from the service's settings)."""

    python: Path  # the vLLM environment's interpreter
    max_lora_rank: int
    max_loras: int
    max_model_len: int
    dtype: str
    cpu_kvcache_gib: int
    threads: int  # OMP threads on a CPU (vLLM takes 1 unless told)
    start_timeout: float
    extra_args: tuple[str, ...] = ()
    log_dir: Path | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmServer:
    """The supervised server of one base model folder; ``name`` is the model id it answers to."""

    name: str
    folder: Path
    options: VllmOptions
    port: int = field(default_factory=free_port)
    adapters: dict[str, Path] = field(default_factory=dict)  # lora name -> folder, loaded again after a restart
    restarts: int = 0
    problem: str | None = None  # why it is not serving, if it is not
    _process: subprocess.Popen[bytes] | None = None
    _healthy: threading.Event = field(default_factory=threading.Event)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _supervisor: threading.Thread | None = None
    _cores: CoreLease | None = None  # this server's cores on a CPU host, kept across restarts

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def command(self) -> list[str]:
        options = self.options
        return [
            str(options.python),
            "-c",
            WATCHDOG,
            str(os.getpid()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.folder),
            "--served-model-name",
            self.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            options.dtype,
            "--max-model-len",
            str(options.max_model_len),
            "--enable-lora",
            "--max-lora-rank",
            str(options.max_lora_rank),
            "--max-loras",
            str(options.max_loras),
            "--disable-log-stats",
            *options.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Conch's own environment must not leak into vLLM's (its site-packages, its torch threads).
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(name, None)
        env["VIRTUAL_ENV"] = str(self.options.python.parent.parent)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.options.cpu_kvcache_gib)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env["HF_HUB_OFFLINE"] = "1"
        if self.options.threads > 0:
            env["OMP_NUM_THREADS"] = str(self.options.threads)
        if self._cores is not None:
            env[BIND_VARIABLE] = self._cores.bind
        return env

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> VllmServer:
        """Start the process and its supervisor; returns once it answers ``/health`` (or raises)."""
        if not self.options.python.is_file():
            raise VllmUnavailable(
                f"vLLM's environment is missing ({self.options.python}); create it with scripts/vllm_env.sh"
            )
        self._spawn()
        try:
            self._wait_started(self.options.start_timeout)
        except BaseException:
            self.stop()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name=f"vllm:{self.name}", daemon=True)
        self._supervisor.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            self._healthy.clear()
            if self._cores is None and BIND_VARIABLE not in os.environ and one_rank(self.options.extra_args):
                self._cores = take_cores(str(self.port), self.options.threads)
            log_file = None
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = self.log_path.open("ab")
            log.info("vllm.starting", extra={"model": self.name, "port": self.port, "cmd": shlex.join(self.command())})
            self._process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log_file or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers form one process group, stopped together
            )
            if log_file is not None:
                log_file.close()

    def _wait_started(self, timeout: float) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise VllmUnavailable(
                        f"vLLM server exited with status {process.returncode} while starting{self._log_tail()}"
                    )
                if self._stopping.is_set():
                    raise VllmUnavailable("vLLM server stopped while starting")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(HEALTH_POLL_SECONDS)
            else:
                raise VllmUnavailable(f"vLLM server gave no /health within {timeout:.0f}s")
            # The database is the registry: every adapter registered with this server comes back after a start.
            for name, path in list(self.adapters.items()):
                try:
                    self._post_adapter(client, name, path)
                except VllmUnavailable as exc:
                    log.error("vllm.adapter_reload_failed", extra={"model": name, "error": str(exc)})
        self.problem = None
        self._healthy.set()
        log.info("vllm.ready", extra={"model": self.name, "port": self.port, "pid": process.pid})

    @property
    def log_path(self) -> Path | None:
        return self.options.log_dir / f"vllm-{self.port}.log" if self.options.log_dir is not None else None

    def _log_tail(self, lines: int = 3) -> str:
        """The end of the server's log (its own account of why it stopped), for the error the operator sees."""
        path = self.log_path
        if path is None:
            return ""
        try:
            with path.open("rb") as handle:
                handle.seek(max(0, path.stat().st_size - 8192))
                tail = handle.read().decode(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ": " + " | ".join(line.strip()[-300:] for line in tail) if tail else ""

    def _supervise(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            process = self._process
            assert process is not None
            started = time.monotonic()
            while process.poll() is None and not self._stopping.is_set():
                time.sleep(HEALTH_POLL_SECONDS)
            if self._stopping.is_set():
                return
            self._healthy.clear()
            self.problem = f"vLLM server exited with status {process.returncode}"
            log.error("vllm.died", extra={"model": self.name, "status": process.returncode})
            if time.monotonic() - started > STABLE_AFTER_SECONDS:
                attempt = 0
            while not self._stopping.is_set():
                delay = RESTART_BACKOFF_SECONDS[min(attempt, len(RESTART_BACKOFF_SECONDS) - 1)]
                attempt += 1
                if self._stopping.wait(delay):
                    return
                try:
                    self._spawn()
                    self._wait_started(self.options.start_timeout)
                    self.restarts += 1
                    break
                except (VllmUnavailable, OSError) as exc:
                    self.problem = str(exc)
                    log.error("vllm.restart_failed", extra={"model": self.name, "error": str(exc)})
                    self._kill()

    def wait_healthy(self, timeout: float) -> bool:
        return self._healthy.wait(timeout) and not self._stopping.is_set()

    def _kill(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._stopping.set()
        self._healthy.clear()
        with self._lock:
            self._kill()
            if self._cores is not None:
                self._cores.release()
                self._cores = None
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(5)

    # ----------------------------------------------------------------------------------- adapters

    def _post_adapter(self, client: httpx.Client, name: str, path: Path) -> None:
        response = client.post(
            f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120.0
        )
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise VllmUnavailable(f"vLLM refused adapter {name!r}: {response.status_code} {response.text[:500]}")

    def load_adapter(self, name: str, path: Path) -> None:
        """Load (or load again) ``path`` as the LoRA model ``name``; registered so that a restart reloads it."""
        if not self.wait_healthy(self.options.start_timeout):
            raise VllmUnavailable(self.problem or "vLLM server is not running")
        with httpx.Client(timeout=10.0) as client:
            self._post_adapter(client, name, path)
        self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        if not self.healthy:
            return
        try:
            with httpx.Client(timeout=10.0) as client:
                client.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as exc:
            log.warning("vllm.unload_failed", extra={"model": name, "error": str(exc)})
