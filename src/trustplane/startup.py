"""Process start-up: the cyclic garbage collector paused while a process imports its modules.

Importing the server (or what a CLI command needs) creates about a million long-lived objects
(modules, classes, functions, SQLAlchemy tables, pydantic models) and next to no garbage, yet the
collector, triggered by allocations, walks the growing heap again and again meanwhile: about a fifth
of the import's CPU time on CPython 3.11 (``python bench/startup.py``). Imports run with the collector
paused; it runs as usual once they are done. Never around request handling.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for the block (if it was on), resume it after."""
    if not gc.isenabled():  # already paused by an enclosing block (or by the embedding program)
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
