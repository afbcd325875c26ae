"""Process start-up: the cyclic garbage collector paused while a process imports its modules, and
the long-lived objects set aside once a server process has started.

Importing the server (or what a CLI command needs) creates about a million long-lived objects
(modules, classes, functions, SQLAlchemy tables, pydantic models) and next to no garbage, yet the
collector, triggered by allocations, walks the growing heap again and again meanwhile: about a fifth
of the import's CPU time on CPython 3.11 (``python bench/startup.py``). Imports run with the collector
paused; it runs as usual once they are done. Never around request handling.

Once a server process has started, those objects (and what its first requests build once: compiled
statements, lazily imported modules, caches) stay for the life of the process, yet every full
collection walks them all again: on the 2-vCPU machine, a full collection of a started worker took
55-135 ms of CPU with 100,000-180,000 objects, a pause of every request in flight, about once per
10-15 s of token load (``bench/token_endpoint.py``). :func:`freeze_after_start` moves them to the
collector's permanent generation (``gc.freeze``) when the worker has started, and once more after
the first full collection that follows (the survivors of the warm-up): later full collections walk
only what was created since. The collector keeps running; frozen objects are still freed by
reference counting, only cyclic garbage among them would never be collected, and the collection
that runs just before each freeze leaves none.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any


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


def freeze_after_start() -> None:
    """A server process has started: collect, freeze what is left, and do it once more after the
    next full collection (the warm-up's survivors)."""
    gc.collect()
    gc.freeze()
    _warm_up.pending = True
    if _warm_up not in gc.callbacks:
        gc.callbacks.append(_warm_up)


class _WarmUp:
    """The collector callback that freezes the survivors of the first full collection after the
    start. It stays registered, disarmed (removing a callback while the collector iterates its
    callbacks would skip the next one); disarmed it costs one call per collection."""

    pending = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if self.pending and phase == "stop" and info["generation"] == 2:
            self.pending = False
            gc.freeze()  # the collection is over: its survivors are what the warm-up kept


_warm_up = _WarmUp()
