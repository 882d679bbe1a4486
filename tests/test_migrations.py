"""The migrations and the ORM describe one schema: on PostgreSQL (production and tests) and on SQLite (the
embedded default), ``alembic upgrade head`` builds what ``core.orm`` declares, with nothing left for autogenerate to
add, and every migration can be undone and done again."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from core.db import make_engine
from core.orm import Base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database(request: pytest.FixtureRequest, database: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own (the run's shared one stays at head for every other test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'conch.db'}"
        return
    server, _, run_database = database.rpartition("/")
    name = f"{run_database}_migrations_{uuid.uuid4().hex[:6]}"
    admin = os.environ.get("TEST_POSTGRES_URL", f"{server}/postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _alembic(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logging"] = False
    config.attributes["url"] = url
    return config


def _schema_differences(url: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_head_builds_the_schema_the_orm_declares(empty_database: str) -> None:
    command.upgrade(_alembic(empty_database), "head")
    assert _tables(empty_database) == set(Base.metadata.tables) | {"alembic_version"}
    assert _schema_differences(empty_database) == []


def test_every_migration_can_be_undone_and_done_again(empty_database: str) -> None:
    config = _alembic(empty_database)
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(config).walk_revisions()))]
    assert len(revisions) >= 2
    for revision in revisions:  # one step at a time: each downgrade undoes exactly its upgrade
        command.upgrade(config, revision)
        command.downgrade(config, "-1")
        command.upgrade(config, revision)
    assert _schema_differences(empty_database) == []
    command.downgrade(config, "base")
    assert _tables(empty_database) <= {"alembic_version"}
