"""What the router matched: the route template a request is counted under, and the methods a path serves."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import Scope

UNMATCHED = "unmatched"


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


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/files/{file_id}``), never the raw path: bounded label values.

    FastAPI's routes record themselves in the scope when they match; any other route is matched again here, and a
    path that matches nothing (404) gets ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", []):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED))
    return UNMATCHED
