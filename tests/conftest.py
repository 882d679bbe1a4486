"""Test session: a real Postgres database built by ``alembic upgrade head``, real Redis, isolated names.

Each run gets its own database, Redis queue name and pub/sub namespace, so several runs can share one
Postgres and one Redis. Tiny random models are built offline once and cached between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests marked `native` run in a child process, so a crash in native code fails only that test.
pytest_plugins = ["tests.isolation"]

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = uuid.uuid4().hex[:10]
RUN_DIR = Path(tempfile.mkdtemp(prefix=f"conch-test-{RUN_ID}-"))
MODEL_CACHE = Path(os.environ.get("CONCH_TEST_MODEL_CACHE", Path(tempfile.gettempdir()) / "conch-test-models"))
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_DB_NAME = f"conch_test_{RUN_ID}"
TINY_MODELS = {"tiny-llama": MODEL_CACHE / "tiny-llama", "tiny-qwen2": MODEL_CACHE / "tiny-qwen2"}

os.environ.update(
    {
        "DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{TEST_DB_NAME}",
        "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "DATA_DIR": str(RUN_DIR / "data"),
        "MODEL_STORE": str(MODEL_CACHE / "base-models"),
        "TRAINING_QUEUE": f"training-{RUN_ID}",
        "NAMESPACE": f"conch-test-{RUN_ID}",
        "BASE_MODELS": json.dumps(
            {"SmolLM2-135M-Instruct": "builtin:smollm2", **{k: str(v) for k, v in TINY_MODELS.items()}}
        ),
        "DEFAULT_BASE_MODEL": "tiny-llama",
        "LEASE_SECONDS": "6",
        "HEARTBEAT_SECONDS": "1",
        "REQUEUE_AFTER_SECONDS": "5",
        "RECONCILE_INTERVAL_SECONDS": "1",
        "DEPLOYMENT_POLL_SECONDS": "0.5",
        # Every in-process request comes from one address ("testclient") and the run shares one namespace: the
        # per-address limits would otherwise count the whole suite; tests of the limits set their own.
        "RATE_LIMIT_PER_MINUTE": "1000000",
        "AUTH_FAILURES_PER_MINUTE": "1000000",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)


def _ensure_services() -> None:
    """Start Postgres and Redis if this machine has them installed but stopped."""
    import psycopg
    import redis

    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError:
        versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
        if versions:
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", "start"], check=False)
            time.sleep(2)
    try:
        redis.Redis.from_url(os.environ["REDIS_URL"], socket_connect_timeout=2).ping()
    except redis.RedisError:
        if shutil.which("redis-server"):
            subprocess.run(
                [
                    "redis-server",
                    "--daemonize",
                    "yes",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    "6379",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                check=False,
            )
            time.sleep(1)


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    import psycopg
    from alembic import command
    from alembic.config import Config

    _ensure_services()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{TEST_DB_NAME}"')
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")
    yield os.environ["DATABASE_URL"]
    from core.db import reset_engine_cache

    reset_engine_cache()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB_NAME}" WITH (FORCE)')
    shutil.rmtree(RUN_DIR, ignore_errors=True)


@pytest.fixture
def clean_db(database: str) -> Iterator[None]:
    """Empty every table before the test (real processes share the database, so no per-test rollback).

    A service a module keeps running (its heartbeat and deployment poll write rows) can take its row locks in
    the other order than TRUNCATE takes its table locks; Postgres then cancels one side as a deadlock, and the
    truncation is simply tried again."""
    from psycopg.errors import DeadlockDetected
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from core.db import get_engine
    from core.orm import Base

    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    for attempt in range(5):
        try:
            with get_engine().begin() as conn:
                conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            break
        except OperationalError as exc:
            if not isinstance(exc.orig, DeadlockDetected) or attempt == 4:
                raise
            time.sleep(0.2)
    yield


@pytest.fixture
def db(clean_db: None) -> Iterator[object]:
    from core.db import get_sessionmaker

    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def _tiny_models_fingerprint() -> str:
    return hashlib.sha256((ROOT / "tests" / "tiny_models.py").read_bytes()).hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Tiny random Llama and Qwen2 models, built offline and cached across runs while tests/tiny_models.py is
    unchanged."""
    from tests.tiny_models import build_tiny_model

    fingerprint = _tiny_models_fingerprint()
    for name, folder in TINY_MODELS.items():
        marker = folder / ".fingerprint"
        if not (marker.exists() and marker.read_text() == fingerprint):
            tmp = folder.with_name(f".{folder.name}.{RUN_ID}")
            build_tiny_model(tmp, "llama" if "llama" in name else "qwen2")
            (tmp / ".fingerprint").write_text(fingerprint)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    return dict(TINY_MODELS)


@pytest.fixture
def log_dir(request: pytest.FixtureRequest) -> Path:
    folder = RUN_DIR / "logs" / request.node.name[:80]
    folder.mkdir(parents=True, exist_ok=True)
    return folder
