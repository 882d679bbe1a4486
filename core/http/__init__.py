"""The HTTP stack both web services share: one error envelope and its handlers, one request-metrics and
access-log middleware with a request id, bearer-key parsing and one readiness body.

Imported by ``api`` and ``inference`` only. These modules are the only part of ``core`` that imports starlette,
fastapi or prometheus-client; the worker never imports them (``tests/test_architecture.py`` checks both), so a
worker image needs no web framework.
"""
