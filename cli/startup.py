"""What makes the command line start sooner."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while importing modules.

    Importing remex, redis, grpc and the protos makes some 100,000 objects
    that live as long as the process and form few cycles: the collector,
    triggered every 700 allocations, walked them again and again (20-40 ms
    of a ``remex build`` on this machine). It runs again afterwards,
    unless it was off already."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
