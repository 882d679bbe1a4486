"""Start-up refusals: a service that others could reach must not start in a state anyone can walk into.

Two rules, checked where the api and inference apps are built (``core.http.listen``) and, through
``python -m core.exposure``, in front of processes Conch does not build, such as Flower:

- Without ``AUTH_REQUIRED`` every request acts as the default tenant (upload, train, deploy, delete), so that mode
  is for loopback only: a service told to listen on any other address refuses to start.
- A secret still holding the example value (``change-me``) is refused everywhere: it is public.

A refusal is one line on stderr naming the setting, and exit status 1; nothing is bound before it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from urllib.parse import unquote, urlsplit

from core.settings import Settings

log = logging.getLogger("conch.startup")

# The value .env.example once shipped for every secret, and its other spellings: public, so no secret.
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "change_me"})
MINT_KEY_HINT = "mint a key with `conch keys create TENANT`"


class StartupRefused(SystemExit):
    """Raised before a service listens. A ``SystemExit`` so that, uncaught, the process ends with exit status 1
    and this one-line message on stderr instead of a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only. A hostname other than ``localhost`` may resolve to
    anything, and an empty host means every interface, so neither counts."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure_problem(settings: Settings, host: str | None) -> str | None:
    """Why a service listening on ``host`` must not start, or None. ``host`` None: the address is not known."""
    if settings.auth_required or host is None or is_loopback(host):
        return None
    where = host or "every interface"
    return (
        f"refusing to listen on {where} with AUTH_REQUIRED=false: anyone who reaches it acts as the default tenant; "
        f"set AUTH_REQUIRED=true and {MINT_KEY_HINT}, or listen on 127.0.0.1"
    )


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:  # an unparsable URL is the database or broker driver's error to report, not ours
        return None
    return unquote(password) if password is not None else None


def placeholder_secrets(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """The settings and variables whose secret is an example value, in a fixed order."""
    found = [
        name
        for name, url in (
            ("DATABASE_URL", settings.database_url),
            ("REDIS_URL", settings.redis_url),
            ("BROKER_URL", settings.broker_url),
        )
        if (_url_password(url) or "").lower() in PLACEHOLDER_SECRETS
    ]
    if environ.get("POSTGRES_PASSWORD", "").strip().lower() in PLACEHOLDER_SECRETS:
        found.append("POSTGRES_PASSWORD")
    # Flower takes user:password pairs separated by commas.
    pairs = [pair for pair in environ.get("FLOWER_BASIC_AUTH", "").split(",") if pair.strip()]
    if any(pair.partition(":")[2].strip().lower() in PLACEHOLDER_SECRETS for pair in pairs):
        found.append("FLOWER_BASIC_AUTH")
    return found


def secrets_problem(settings: Settings, environ: Mapping[str, str]) -> str | None:
    names = placeholder_secrets(settings, environ)
    if not names:
        return None
    return (
        f"refusing to start: {', '.join(names)} still holds the example secret 'change-me'; "
        "set a real one (e.g. `openssl rand -hex 24`) in .env"
    )


def check_startup(
    settings: Settings, *, service: str, host: str | None, environ: Mapping[str, str] | None = None
) -> None:
    """Refuse to start ``service`` (raise ``StartupRefused``) when it would be open to anyone. ``host``: the
    address it will listen on, None when unknown (only the secrets are checked then)."""
    environ = os.environ if environ is None else environ
    problem = secrets_problem(settings, environ) or exposure_problem(settings, host)
    if problem is not None:
        log.error("startup.refused", extra={"service": service, "host": host, "reason": problem})
        raise StartupRefused(problem)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m core.exposure -- COMMAND...``: run COMMAND (in this process's place) unless a secret in the
    environment is an example value. For processes Conch does not build, such as Flower in the compose stack."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    problem = secrets_problem(Settings(), os.environ)
    if problem is not None:
        raise StartupRefused(problem)
    if not args:
        return
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
