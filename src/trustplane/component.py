"""What a component is to the composition root (``trustplane.app``), and nothing more.

A component is one package's running part: its services, its routes, and the moments of its life.
Each package says in its ``wiring.py`` how it is built (a ``build(settings, db, ...)`` function
taking what it needs from lower components) and returns an object of this shape; ``app.py`` holds
the list and runs a few loops over it:

- ``start()``, in list order, before the first request: load caches, create what must exist.
- ``run(stopping)``, as a task from after ``start`` until shutdown: the component's own background
  loop (the audit sequencer), if it has one. Shutdown sets ``stopping`` and waits for it.
- ``reload()``, from the refresh loop, when one of the generation counters named in ``watches``
  (``trustplane.storage.generations``) moved since the last poll: another process (or this one)
  changed what the component caches. It reloads and updates its own metrics.
- ``maintain()``, from the maintenance loop (every minute): pruning, scheduled rotation, delivery
  retries. A failure is logged and does not stop the other components' maintenance.
- ``close()``, in reverse list order, after the loops and ``run`` tasks are stopped: flush, close
  outbound connections. The database is disposed after the last component.

``routes()`` gives the component's HTTP routes: ``api`` ones go through FastAPI (admin APIs,
registration, pages), ``fast`` ones are protocol hot paths that skip FastAPI's middleware. A route
behind a bearer token takes the one ``BearerGuard``, given to the component when it is built.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fastapi import APIRouter
    from starlette.routing import BaseRoute, Route


@dataclass(frozen=True, slots=True)
class Routes:
    """A component's routes: ``api`` through FastAPI, ``fast`` straight to their handlers."""

    api: Sequence[APIRouter | BaseRoute] = ()
    fast: Sequence[Route] = ()


class Component(Protocol):
    @property
    def name(self) -> str:
        """Short and stable: the ``cache`` label of ``trustplane_cache_reloads_total`` and logs."""

    @property
    def watches(self) -> tuple[str, ...]:
        """The generation counters whose move means :meth:`reload` (empty: nothing cached)."""

    def routes(self) -> Routes:
        """The routes this component serves (none is fine)."""

    async def start(self) -> None:
        """Ready to serve: caches loaded, what must exist created (idempotent across processes)."""

    async def run(self, stopping: asyncio.Event) -> None:
        """Its background loop for the app's lifetime (returns at once if it has none). Returns
        soon after ``stopping`` is set, finishing the round in progress (never cancelled inside a
        transaction unless it overstays the shutdown grace period)."""

    async def reload(self) -> None:
        """A watched counter moved: reload from the database and update the metrics it owns."""

    async def maintain(self) -> None:
        """Periodic upkeep; must be safe to run in every process at once."""

    async def close(self) -> None:
        """Stop own tasks, flush, close connections; the database is still open."""


class Idle:
    """Defaults for a component that does nothing at one of the moments: subclass and override."""

    watches: tuple[str, ...] = ()

    def routes(self) -> Routes:
        return Routes()

    async def start(self) -> None:
        return None

    async def run(self, stopping: asyncio.Event) -> None:
        return None

    async def reload(self) -> None:
        return None

    async def maintain(self) -> None:
        return None

    async def close(self) -> None:
        return None
