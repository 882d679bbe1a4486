"""Where an HTTP service is about to listen, and the start-up refusal (``core.exposure``) applied to it.

uvicorn builds the app (``--factory``) before it binds and never tells the app its address, so the address is
read from uvicorn's own parse of its command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click
from uvicorn.main import main as uvicorn_main

from core.exposure import check_startup
from core.settings import Settings


def _is_uvicorn_argv(argv: Sequence[str]) -> bool:
    if not argv:
        return False
    program = Path(argv[0])
    return program.name == "uvicorn" or (program.name == "__main__.py" and program.parent.name == "uvicorn")


def uvicorn_bind_host(argv: Sequence[str] | None = None) -> str | None:
    """The address uvicorn is about to listen on, when uvicorn's command line started this process.

    The running command's options (``--host``, ``UVICORN_HOST`` or the default) or, in a ``--workers`` or
    ``--reload`` child (which inherits the parent's ``sys.argv``), the same parse of the command line. None
    when the app was built some other way (tests, an embedding program) or listens on a Unix socket or an
    inherited descriptor, whose reach this cannot tell.
    """
    params: dict[str, object] | None = None
    context = click.get_current_context(silent=True)
    if argv is None and context is not None and context.command is uvicorn_main:
        params = dict(context.params)
    else:
        args = list(sys.argv if argv is None else argv)
        if _is_uvicorn_argv(args):
            try:
                params = dict(uvicorn_main.make_context("uvicorn", args[1:]).params)
            except (click.ClickException, click.exceptions.Exit):  # not a command line uvicorn would have run
                return None
    if params is None or params.get("uds") or params.get("fd") is not None:
        return None
    host = params.get("host")
    return host if isinstance(host, str) else None


def refuse_unsafe_start(settings: Settings, *, service: str, host: str | None = None) -> None:
    """Called where an app is built: ``StartupRefused`` (exit status 1, one line naming the setting) when the
    service would listen beyond loopback without AUTH_REQUIRED, or a secret is an example value."""
    check_startup(settings, service=service, host=host if host is not None else uvicorn_bind_host())
