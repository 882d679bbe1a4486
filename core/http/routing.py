"""Small HTTP pieces both web services share (imported by api and inference only; the worker never needs it)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Match, Route


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path, for a 405's ``Allow``: Starlette's own 405 names only the
    methods of the first route that matched the path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": next(iter(route.methods))})
            if match == Match.FULL:
                methods |= route.methods
    return ", ".join(sorted(methods))
