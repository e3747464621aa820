"""tasks.flower: Flower's /metrics handler wrapped in tornado's login check."""

from __future__ import annotations

from flower.views import monitor  # type: ignore[import-untyped]

from tasks.flower import protect_metrics


def test_metrics_is_wrapped_once_however_often_it_is_asked() -> None:
    # When the protection is applied twice
    assert protect_metrics()
    first = monitor.Metrics.get
    assert protect_metrics()
    # Then /metrics's handler is the login-checked one, wrapped only once
    assert monitor.Metrics.get is first
    assert getattr(first, "_remex_needs_auth", False)
