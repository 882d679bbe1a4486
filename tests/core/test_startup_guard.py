"""The start-up refusal: no service listens beyond loopback without AUTH_REQUIRED, and none starts with an example
secret. The real services are started the way compose and ``conch up`` start them (uvicorn's command line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from core.exposure import StartupRefused, check_startup, exposure_problem, is_loopback, placeholder_secrets
from core.http.listen import uvicorn_bind_host
from core.settings import Settings
from tests.processes import ROOT, ServiceProcess, free_port

UVICORN = str(Path(sys.executable).parent / "uvicorn")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.2", "api.example.com", "localhost.evil"])
def test_everything_else_counts_as_exposed(host: str) -> None:
    assert not is_loopback(host)
    problem = exposure_problem(Settings(auth_required=False), host)
    assert problem is not None and "AUTH_REQUIRED=false" in problem and "\n" not in problem
    assert exposure_problem(Settings(auth_required=True), host) is None


def test_single_tenant_mode_stays_for_loopback_and_unknown_addresses() -> None:
    settings = Settings(auth_required=False)
    assert exposure_problem(settings, "127.0.0.1") is None
    assert exposure_problem(settings, None) is None  # built in a test or an embedding program: not listening


def test_example_secrets_are_named() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://conch:change-me@postgres:5432/conch",
        redis_url="redis://:CHANGE-ME@redis:6379/0",
        broker_url="redis://redis:6379/0",
    )
    environ = {"FLOWER_BASIC_AUTH": "ops:s3cret,admin:change-me", "POSTGRES_PASSWORD": "change-me"}
    assert placeholder_secrets(settings, environ) == [
        "DATABASE_URL",
        "REDIS_URL",
        "POSTGRES_PASSWORD",
        "FLOWER_BASIC_AUTH",
    ]
    real = Settings(database_url="postgresql+psycopg://conch:7c1e9a@postgres:5432/conch", redis_url="redis://redis")
    assert placeholder_secrets(real, {"FLOWER_BASIC_AUTH": "ops:7c1e9a", "POSTGRES_PASSWORD": "7c1e9a"}) == []


def test_check_startup_raises_one_line_naming_the_setting() -> None:
    with pytest.raises(StartupRefused) as refused:
        check_startup(Settings(auth_required=False), service="api", host="0.0.0.0", environ={})
    assert refused.value.code == refused.value.message and "AUTH_REQUIRED" in refused.value.message
    secret = Settings(auth_required=True, database_url="postgresql://conch:change-me@db/conch")
    with pytest.raises(StartupRefused, match="DATABASE_URL"):
        check_startup(secret, service="api", host="127.0.0.1", environ={})


@pytest.mark.parametrize(
    ("argv", "host"),
    [
        ([UVICORN, "api.app:create_app", "--factory", "--host", "0.0.0.0"], "0.0.0.0"),
        (["/x/site-packages/uvicorn/__main__.py", "app:make", "--host=::", "--workers", "2"], "::"),
        ([UVICORN, "api.app:create_app"], "127.0.0.1"),  # uvicorn's own default
        ([UVICORN, "api.app:create_app", "--uds", "/run/conch.sock"], None),
        ([UVICORN, "api.app:create_app", "--fd", "3"], None),
        (["/usr/bin/pytest", "--host", "0.0.0.0"], None),  # not uvicorn: the address is unknown
    ],
)
def test_uvicorn_bind_host_reads_uvicorn_s_own_parse(argv: list[str], host: str | None) -> None:
    assert uvicorn_bind_host(argv) == host


def test_uvicorn_bind_host_honours_uvicorn_s_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UVICORN_HOST", "10.1.2.3")
    assert uvicorn_bind_host([UVICORN, "api.app:create_app"]) == "10.1.2.3"


def _uvicorn(factory: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", host, "--port", str(port)]


@pytest.mark.parametrize("factory", ["api.app:create_app", "inference.app:create_app"])
def test_a_service_refuses_to_listen_on_every_interface_without_auth(factory: str) -> None:
    port = free_port()
    result = subprocess.run(
        _uvicorn(factory, "0.0.0.0", port),
        cwd=ROOT,
        env={**os.environ, "AUTH_REQUIRED": "false", "LOG_JSON": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("refusing to listen on 0.0.0.0 with AUTH_REQUIRED=false"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    with pytest.raises(httpx.HTTPError):  # nothing was bound
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_service_refuses_an_example_secret() -> None:
    url = urlsplit(os.environ["DATABASE_URL"])
    database_url = urlunsplit(url._replace(netloc=f"{url.username}:change-me@{url.hostname}:{url.port or 5432}"))
    result = subprocess.run(
        _uvicorn("api.app:create_app", "127.0.0.1", free_port()),
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("refusing to start: DATABASE_URL"), result.stderr[-2000:]


@pytest.mark.parametrize(("host", "auth"), [("127.0.0.1", "false"), ("0.0.0.0", "true")])
def test_loopback_without_auth_and_any_address_with_auth_start(tmp_path: Path, host: str, auth: str) -> None:
    port = free_port()
    api = ServiceProcess(
        "api",
        [*_uvicorn("api.app:create_app", host, port), "--log-level", "warning"],
        env={"AUTH_REQUIRED": auth},
        log_dir=tmp_path,
    ).start()
    try:
        api.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90)
        status = httpx.get(f"http://127.0.0.1:{port}/v1/files", timeout=10).status_code
        assert status == (401 if auth == "true" else 200)
    finally:
        api.stop()


def test_the_exposure_wrapper_refuses_an_example_secret_then_runs_the_command() -> None:
    command = [sys.executable, "-m", "core.exposure", "--", sys.executable, "-c", "print('flower ran')"]
    refused = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "FLOWER_BASIC_AUTH": "admin:change-me"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "flower ran" not in refused.stdout
    assert refused.stderr.strip() == (
        "refusing to start: FLOWER_BASIC_AUTH still holds the example secret 'change-me'; "
        "set a real one (e.g. `openssl rand -hex 24`) in .env"
    )
    ran = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "FLOWER_BASIC_AUTH": "ops:4b8e1f0c"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0 and ran.stdout.strip() == "flower ran"
