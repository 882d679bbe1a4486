"""Apply Alembic migrations from code (``conch up``, the demo, the compose stack's one-shot service)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[1]


def upgrade_head(url: str | None = None) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logging"] = False
    if url:
        config.attributes["url"] = url
    command.upgrade(config, "head")
