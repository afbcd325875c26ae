"""Readiness (``/readyz``): can this process serve requests that must write?

Liveness (``/healthz``) only says the process answers. Readiness checks, each with a bounded time:

* ``database``: a committed write (a heartbeat counter in ``cache_generations``, bumped without
  notifying the other processes: no cache depends on it), which proves the database accepts writes
  now, not only reads; for SQLite also that the data directory is writable and has at least
  ``MIN_FREE_BYTES`` free (a full disk fails commits that need new pages).
* ``keys``: an active signing key is loaded.
* ``ledger``: the audit ledger's sequencer loop made progress recently (``Ledger.last_progress``).
* ``redis`` (only with ``TRUSTPLANE_REDIS_URL``): the replay cache answers ``PING``.

200 when every check passes, else 503; the body lists each check. The result is kept for
``CACHE_SECONDS`` and concurrent probes share one evaluation, so a probe flood costs at most one
database write per second per process. Failure reasons are short texts, never exception messages
(those go to the log).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import Gauge
from sqlalchemy.engine import make_url

from trustplane.storage import generations

if TYPE_CHECKING:
    from trustplane.services import Services

log = structlog.get_logger("trustplane.readiness")

CACHE_SECONDS = 1.0
CHECK_TIMEOUT = 2.0
MIN_FREE_BYTES = 16 << 20
HEARTBEAT = "readyz_heartbeat"

READY = Gauge(
    "trustplane_ready",
    "1 if the last readiness evaluation passed, else 0",
    multiprocess_mode="livemostrecent",
)


class NotReady(Exception):
    """A check failed; ``str(self)`` is the short reason shown in ``/readyz``."""


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    checks: dict[str, dict[str, Any]]

    def body(self) -> dict[str, Any]:
        return {"status": "ready" if self.ready else "not_ready", "checks": self.checks}


class ReadinessProbe:
    def __init__(self, services: Services, clock: Callable[[], float] = time.monotonic) -> None:
        self._svc = services
        self._clock = clock
        self._cached: tuple[float, Readiness] | None = None
        self._running: asyncio.Task[Readiness] | None = None

    async def evaluate(self) -> Readiness:
        """The cached result if it is younger than ``CACHE_SECONDS``, else a fresh one (shared by
        every probe that arrives while it is computed)."""
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < CACHE_SECONDS:
            return self._cached[1]
        if self._running is None:
            self._running = asyncio.create_task(self._evaluate())
        try:
            return await asyncio.shield(self._running)
        finally:
            if self._running is not None and self._running.done():
                self._running = None

    async def _evaluate(self) -> Readiness:
        checks: dict[str, Callable[[], Awaitable[None]]] = {
            "database": self._database,
            "keys": self._keys,
            "ledger": self._ledger,
        }
        if self._svc.settings.redis_url:
            checks["redis"] = self._redis
        results = {name: await _run(name, check) for name, check in checks.items()}
        readiness = Readiness(all(r["ok"] for r in results.values()), results)
        READY.set(1 if readiness.ready else 0)
        self._cached = (self._clock(), readiness)
        return readiness

    async def _database(self) -> None:
        db = self._svc.db
        if db.is_sqlite:
            path = make_url(db.url).database
            if path and path != ":memory:":
                _check_sqlite_directory(Path(path))
        try:
            async with db.transaction() as conn:
                await generations.bump(conn, HEARTBEAT, notify=False)  # nothing to reload
        except Exception as exc:
            log.warning("readiness_database_not_writable", error=f"{type(exc).__name__}: {exc}")
            raise NotReady("the database does not accept writes") from None

    async def _keys(self) -> None:
        if self._svc.keys.ring.signer is None:
            raise NotReady("no active signing key is loaded")

    async def _ledger(self) -> None:
        age = self._svc.ledger.progress_age()
        limit = max(5.0, 25 * self._svc.settings.audit_integrate_interval)
        if age is None:
            raise NotReady("the ledger sequencer has not run yet")
        if age > limit:
            raise NotReady(f"the ledger sequencer made no progress for {age:.0f} s")

    async def _redis(self) -> None:
        ping = getattr(self._svc.replay, "ping", None)
        if ping is None:
            return
        try:
            await ping()
        except Exception as exc:
            log.warning("readiness_redis_unavailable", error=f"{type(exc).__name__}: {exc}")
            raise NotReady("redis does not answer") from None


async def _run(name: str, check: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except NotReady as exc:
        return {"ok": False, "reason": str(exc)}
    except TimeoutError:
        return {"ok": False, "reason": f"no answer within {CHECK_TIMEOUT:g} s"}
    except Exception as exc:  # a failing check is "not ready", never a 500
        log.warning("readiness_check_failed", check=name, error=f"{type(exc).__name__}: {exc}")
        return {"ok": False, "reason": "the check failed"}
    return {"ok": True}


def _check_sqlite_directory(database: Path) -> None:
    """A read-only data directory or file, or a nearly full disk, fails the next commit that needs
    to create or grow a file; say so before it does."""
    directory = database.parent
    for path in (directory, database):
        if path.exists() and not _writable(path):
            what = "the data directory" if path == directory else "the database file"
            raise NotReady(f"{what} is read-only")
    if shutil.disk_usage(directory).free < MIN_FREE_BYTES:
        raise NotReady(f"less than {MIN_FREE_BYTES >> 20} MiB free on the data directory's disk")


def _writable(path: Path) -> bool:
    """``os.access`` is true for root whatever the mode bits say; read them as well."""
    if not os.access(path, os.W_OK):
        return False
    return os.geteuid() != 0 or bool(path.stat().st_mode & 0o222)
