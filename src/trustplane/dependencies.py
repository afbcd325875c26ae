"""The services trustplane depends on (database, Redis, NATS): how their failures reach the wire,
the log and the metrics, and the reachability warnings at start.

A dependency that fails is not a bug of ours and not the client's fault: the request is refused with
503 ``temporarily_unavailable`` and ``Retry-After`` (RFC 6749 §5.2 body; RFC 9110 §10.2.3), fail
closed, never a 500. The cause is logged once per incident (:class:`IncidentLog`: the first failure,
then at most one line per ``INCIDENT_LOG_INTERVAL`` with the number of failures in between) and counted
in ``trustplane_dependency_unavailable_total{dependency}``.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import structlog
from prometheus_client import Counter
from sqlalchemy import exc as sa_exc

from trustplane.errors import TemporarilyUnavailableError
from trustplane.settings import Settings

LOGGER = "trustplane.dependencies"

RETRY_AFTER = 1
INCIDENT_LOG_INTERVAL = 60.0
PROBE_TIMEOUT = 2.0

UNAVAILABLE = Counter(
    "trustplane_dependency_unavailable_total",
    "Requests refused 503 because a dependency failed, by dependency",
    ["dependency"],
)


class IncidentLog:
    """Rate-limited error logging: one line per dependency per ``interval`` seconds."""

    def __init__(self, interval: float = INCIDENT_LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def failed(self, dependency: str, error: BaseException, **context: object) -> bool:
        """Log ``error`` unless this dependency was logged less than ``interval`` ago; True if
        logged."""
        now = time.monotonic()
        last = self._last.get(dependency)
        if last is not None and now - last < self._interval:
            self._suppressed[dependency] = self._suppressed.get(dependency, 0) + 1
            return False
        self._last[dependency] = now
        suppressed = self._suppressed.pop(dependency, 0)
        structlog.get_logger(LOGGER).error(
            "dependency_unavailable",
            dependency=dependency,
            error=f"{type(error).__name__}: {error}",
            failures_not_logged=suppressed,
            **context,
        )
        return True


INCIDENTS = IncidentLog()


def unavailable(
    dependency: str, error: BaseException, **context: object
) -> TemporarilyUnavailableError:
    """Count and (rate-limited) log a dependency failure; the error to raise or render."""
    UNAVAILABLE.labels(dependency=dependency).inc()
    INCIDENTS.failed(dependency, error, **context)
    return TemporarilyUnavailableError(
        f"a service this request needs ({dependency}) is unavailable; try again shortly",
        headers={"Retry-After": str(RETRY_AFTER)},
    )


#: SQLSTATEs of a PostgreSQL server that cannot serve now, whatever the query: class 08
#: (connection exception), class 53 (insufficient resources: 53300 too many connections, disk
#: full, out of memory), 57P01-57P03 (shutting down, crashed, cannot connect now: start-up or
#: recovery). asyncpg's errors reach SQLAlchemy as a plain ``DBAPIError`` carrying the code.
_UNAVAILABLE_CLASSES = ("08", "53")
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03"})


def database_failure(error: BaseException) -> bool:
    """True for a lost, unreachable or exhausted database (as opposed to a query the database
    refused): the request is answered 503 with ``Retry-After``, never 500."""
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        state = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
        if isinstance(state, str) and (
            state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES
        ):
            return True
    return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError)


# --------------------------------------------------------------------------- start-up warnings


async def warn_unreachable(settings: Settings) -> list[str]:
    """One warning line for each configured dependency that does not answer now (the server starts
    anyway; requests that need it are answered 503). Returns the names that failed."""
    probes = {"redis": _redis, "nats": _nats}
    if not settings.is_embedded:
        probes = {"postgresql": _postgresql, **probes}
    failed = []
    for name, probe in probes.items():
        target = _target(settings, name)
        if not target:
            continue
        try:
            await asyncio.wait_for(probe(settings), PROBE_TIMEOUT)
        except Exception as exc:  # any failure is "unreachable": the warning carries it
            failed.append(name)
            structlog.get_logger(LOGGER).warning(
                "dependency_unreachable_at_start",
                dependency=name,
                target=target,
                error=f"{type(exc).__name__}: {exc}",
            )
    return failed


def _target(settings: Settings, name: str) -> str:
    """host:port of a dependency's URL (never its credentials), empty if not configured."""
    url = {
        "postgresql": settings.effective_database_url,
        "redis": settings.redis_url,
        "nats": settings.nats_url,
    }[name]
    if not url:
        return ""
    parts = urlsplit(url.split(",")[0])
    return f"{parts.hostname or ''}:{parts.port or ''}"


#: Tables whose rows are deleted about as fast as they are inserted (the ledger's pending entries,
#: expired single-use ``jti`` values, codes and revocations, published SSF outbox rows): without
#: vacuum their dead rows grow with the traffic and every read goes through them.
CHURN_TABLES = (
    "audit_pending",
    "used_jtis",
    "authorization_codes",
    "revoked_tokens",
    "ssf_outbox",
)
#: Dead rows in one churn table above which the start-up check warns (autovacuum's default trigger
#: for a near-empty table is 50 dead rows: this many means vacuum is not keeping up).
DEAD_ROWS_WARNING = 100_000

_VACUUM_STATE = """
SELECT c.relname, COALESCE(s.n_dead_tup, 0),
       COALESCE('autovacuum_enabled=false' = ANY (c.reloptions), false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relkind = 'r' AND c.relname = ANY (:tables)
ORDER BY c.relname
"""


async def _postgresql(settings: Settings) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from trustplane.storage.db import async_url

    engine = create_async_engine(async_url(settings.effective_database_url), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            server_on = (await conn.execute(text("SELECT current_setting('autovacuum')"))).scalar()
            tables = (await conn.execute(text(_VACUUM_STATE), {"tables": list(CHURN_TABLES)})).all()
    finally:
        await engine.dispose()
    warn_vacuum(server_on == "on", [(str(t[0]), int(t[1]), bool(t[2])) for t in tables])


def warn_vacuum(server_on: bool, tables: list[tuple[str, int, bool]]) -> list[str]:
    """Warn at start when PostgreSQL will not vacuum the churn tables (``autovacuum`` off on the
    server, or ``autovacuum_enabled = false`` on a table) or when one already holds more than
    :data:`DEAD_ROWS_WARNING` dead rows (docs/operations.md "Backups"). ``tables``: (name, dead
    rows, autovacuum disabled on the table). Returns the events logged."""
    log = structlog.get_logger(LOGGER)
    events = []
    off = [name for name, _dead, disabled in tables if disabled or not server_on]
    if off:
        events.append("database_autovacuum_off")
        log.warning(
            "database_autovacuum_off",
            scope="server" if not server_on else "table",
            tables=off,
            consequence="dead rows of these tables grow with the traffic; run VACUUM or turn "
            "autovacuum on (docs/operations.md, Backups)",
        )
    bloated = {name: dead for name, dead, _disabled in tables if dead > DEAD_ROWS_WARNING}
    if bloated:
        events.append("database_dead_rows")
        log.warning(
            "database_dead_rows",
            dead_rows=bloated,
            threshold=DEAD_ROWS_WARNING,
            consequence="reads of these tables slow down; run VACUUM (docs/operations.md, Backups)",
        )
    return events


async def _redis(settings: Settings) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(settings.redis_url, socket_connect_timeout=PROBE_TIMEOUT)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _nats(settings: Settings) -> None:
    parts = urlsplit(settings.nats_url.split(",")[0])
    _reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 4222)
    writer.close()
    await writer.wait_closed()
