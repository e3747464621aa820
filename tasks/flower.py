"""Flower's ``/metrics`` behind Flower's own authentication.

Flower (2.x) asks for the password on its pages and API but serves
``/metrics`` (Prometheus) to anyone: task names and counts, worker names,
runtimes. remex closes that: :func:`protect_metrics` makes ``/metrics`` need
the same basic auth (or OAuth login) as the pages, so a Prometheus scrape
job sends ``basic_auth``. ``/healthcheck`` (it says ``OK``) stays open for
health checks. :mod:`tasks.app` calls it whenever Flower runs on remex's app
(``celery -A tasks.app flower``), so every way of starting Flower gets it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["protect_metrics"]

_MARK = "_remex_needs_auth"


def protect_metrics() -> bool:
    """Make Flower's ``/metrics`` need the login the pages need (idempotent).

    Returns True once ``/metrics`` is protected; False when Flower is not
    installed.
    """
    try:
        from flower.views import monitor  # type: ignore[import-untyped]
        from tornado import web
    except ImportError:
        return False
    handler: Any = monitor.Metrics
    if not getattr(handler.get, _MARK, False):
        # tornado.web.authenticated: no current user -> 401 from Flower's
        # basic-auth check (or 403 / the login page with OAuth), as on /tasks.
        # Without any auth configured, Flower's current user is always set.
        protected = web.authenticated(handler.get)
        setattr(protected, _MARK, True)
        handler.get = protected
    return True
