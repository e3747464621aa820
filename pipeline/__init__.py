"""remex: BuildStream-style elements built on a REAPI service, one Celery task per stage.

The scripting API (loaded on first use, so that ``import pipeline.cas`` stays light)::

    import pipeline
    build_id = pipeline.submit("examples/hello", ["app.bst"])
    pipeline.wait(build_id)
    for event in pipeline.events(build_id):   # each element state change
        ...
    pipeline.builds(state="running")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("submit", "wait", "status", "cancel", "events", "builds")


def __getattr__(name: str) -> Any:
    if name in _API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
