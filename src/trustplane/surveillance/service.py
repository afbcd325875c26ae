"""The surveillance service: tails the ledger by leaf index with a cursor kept in the database and
runs the detector over what it reads.

One round reads up to ``batch`` integrated leaves from the cursor (outside any write: leaves never
change), then in one transaction claims the detector (only one round runs at a time across every
process and instance on the database) and checks that the cursor is still where it read from, runs
the signals, append each alert as a ``surveillance:alert:raised`` ledger entry through the audit
sink's append (:func:`trustplane.audit.sink.write_events`, in this transaction), and move the cursor
past the leaves read. Either all of it commits or none of it does: a crash or a lost race leaves the
cursor where it was and the next round reads the same leaves again, so no alert is lost and none is
raised twice. The metric and the log line follow the commit.

Why the ledger and not the sink's observers: an observer runs in the appending process, so its
state would be per process (or it would need its own locking on every request's write path), and
what a crashed process observed but did not count would be lost. The ledger is the one ordered,
durable stream every process writes to; reading it off the request path costs requests nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.sink import write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.settings import Settings
from trustplane.storage.db import Database, is_disconnect
from trustplane.surveillance import store
from trustplane.surveillance.detector import Detection, Detector
from trustplane.surveillance.signals import SLICE, WATCHED, Alert, Observed, Signal, Thresholds
from trustplane.surveillance.store import SurveillanceStore

log = structlog.get_logger("trustplane.surveillance")
ALERTS = Counter(
    "trustplane_surveillance_alerts_total",
    "Surveillance alerts raised into the ledger, by signal",
    ["signal"],
)
FAILURES = Counter("trustplane_surveillance_failures_total", "Failed surveillance rounds")
#: Leaves per round unless ``surveillance_batch`` says. A round costs about ten statements whatever
#: its size (~3.75 ms of CPU on PostgreSQL, ~6.5 ms on SQLite), so under a token load larger rounds
#: keep up for half the CPU per leaf (bench/surveillance.py, docs/surveillance.md). On SQLite a
#: round holds the database's write lock for its detection: 2,000 leaves hold it ~7 ms against ~4
#: for 500, in a quarter of the rounds. On PostgreSQL its claim blocks no request.
SQLITE_BATCH = 2000
#: Alerts appended (canonical entries) or logged between two turns of the event loop (~1-2 ms).
ALERT_SLICE = 32
POSTGRESQL_BATCH = 5000
POSTGRESQL_BATCH = 5000
for _signal in Signal:  # every series exists from the start, so increase() sees the first alert
    ALERTS.labels(signal=_signal.value)


@dataclass(frozen=True, slots=True)
class Round:
    """One committed round: leaves read (the cursor moved by as many) and alerts raised."""

    read: int
    alerts: list[Alert]


async def observe(leaves: Sequence[Sequence[Any]]) -> list[Observed]:
    """The watched leaves as the detector reads them, :data:`SLICE` at a time with the event loop's
    turn between slices (a round of thousands would otherwise hold up every request of the
    process for tens of milliseconds)."""
    events: list[Observed] = []
    for first in range(0, len(leaves), SLICE):
        if first:
            await asyncio.sleep(0)
        events += (
            Observed.from_leaf(leaf) for leaf in leaves[first : first + SLICE] if leaf[1] in WATCHED
        )
    return events


class Surveillance:
    def __init__(self, settings: Settings, db: Database, state: SurveillanceStore) -> None:
        self._settings, self._db, self._store = settings, db, state
        self.thresholds = Thresholds.from_settings(settings)
        self._detector = Detector(state, self.thresholds)
        self._batch = settings.surveillance_batch or (
            SQLITE_BATCH if db.is_sqlite else POSTGRESQL_BATCH
        )

    async def start(self) -> None:
        async with self._db.transaction() as conn:
            await store.ensure_cursor(conn)

    async def round(self) -> Round | None:
        """One round; None if another detector holds the claim right now, or (SQLite) moved the
        cursor since this round read the leaves (the next round reads from where it is)."""
        if not await self._unread():  # nothing new: no write, no lock (an idle deployment)
            return Round(0, [])
        if self._db.is_sqlite:
            # SQLite: the claim is the database's write lock, which every token request's commit
            # waits for. Everything that only reads comes first (the cursor first of all): the
            # leaves (integrated leaves never change) and the detection over the state as it is;
            # the claim then checks the cursor has not moved, so neither has the state (only a
            # round that moves the cursor changes it), and holds the lock for the writes alone
            async with self._db.read() as conn:
                start = await store.read_cursor(conn)
                leaves = await store.read_leaves(conn, start, self._batch)
                if not leaves:
                    return Round(0, [])
                detection = await self._detector.prepare(conn, await observe(leaves))
            async with self._db.transaction() as conn:
                if await self._store.claim(conn) != start:  # another round moved the cursor
                    return None
                await self._write(conn, start, leaves, detection)
        else:
            # PostgreSQL: the claim (an advisory lock) is nothing a request waits for; the leaves
            # are read under it, so a process that loses the claim reads none
            async with self._db.transaction() as conn:
                claimed = await self._store.claim(conn)
                if claimed is None:  # another detector holds the claim
                    return None
                start = claimed
                leaves = await store.read_leaves(conn, start, self._batch)
                if not leaves:
                    return Round(0, [])
                detection = await self._detector.prepare(conn, await observe(leaves))
                await self._write(conn, start, leaves, detection)
        alerts = detection.alerts
        for offset, alert in enumerate(alerts):
            if offset and not offset % ALERT_SLICE:
                await asyncio.sleep(0)
            ALERTS.labels(signal=alert.signal.value).inc()
            log.warning(
                "surveillance_alert",
                signal=alert.signal.value,
                client_id=alert.client_id,
                partner=alert.partner,
                observed=alert.observed,
                threshold=alert.threshold,
                evidence=list(alert.evidence),
                transaction_id=alert.transaction_id,
            )
        return Round(len(leaves), alerts)

    async def _write(
        self,
        conn: AsyncConnection,
        start: int,
        leaves: Sequence[Sequence[Any]],
        detection: Detection,
    ) -> None:
        """In the claimed transaction: the detector's state, the alerts' ledger entries and the
        cursor past the leaves read (compare-and-set from ``start``)."""
        await self._detector.write(conn, detection)
        alerts = detection.alerts
        for first in range(0, len(alerts), ALERT_SLICE):  # a storm (a history read) in slices
            if first:
                await asyncio.sleep(0)
            await write_events(conn, [self.event(a) for a in alerts[first : first + ALERT_SLICE]])
        await self._store.advance(conn, start, int(leaves[-1][0]) + 1)

    async def _unread(self) -> bool:
        """Whether the log has leaves the cursor has not passed: one statement, on PostgreSQL on the
        autocommit engine (one round trip where a pooled connection adds ``BEGIN`` and ``ROLLBACK``;
        once more on a fresh connection if the pooled one turns out to be dead: checkouts are not
        pre-pinged)."""
        if self._db.is_sqlite:
            async with self._db.read() as conn:
                return await store.has_unread(conn)
        for attempt in (1, 2):
            async with self._db.autocommit_engine.connect() as conn:
                try:
                    return await store.has_unread(conn)
                except Exception as exc:
                    if attempt == 2 or not is_disconnect(exc):
                        raise
        raise AssertionError("unreachable")

    async def catch_up(self) -> list[Alert]:
        """Rounds until the cursor is at the end of the integrated log (or another detector has
        the claim); the alerts this process raised."""
        raised: list[Alert] = []
        while (done := await self.round()) is not None and done.read:
            raised += done.alerts
            if done.read < self._batch:
                break
        return raised

    async def run(self, stopping: asyncio.Event) -> None:
        """Catch up every ``surveillance_interval`` seconds until ``stopping`` is set; a round in
        progress finishes (never abandoned inside its transaction)."""
        while not stopping.is_set():
            try:
                await self.catch_up()
            except Exception as exc:  # the cursor did not move: the next round reads it again
                FAILURES.inc()
                log.error("surveillance_round_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._settings.surveillance_interval)

    async def prune(self, now: int | None = None) -> int:
        """Forget windows no baseline reaches any more (safe in every process at once)."""
        now_ms = (int(time.time()) if now is None else now) * 1000
        t = self.thresholds
        keep = (
            (Signal.ISSUANCE_SPIKE, t.issuance_window_s, t.issuance_baseline_windows + 2),
            (Signal.CLAIM_FAILURES, t.claim_window_s, 2),
        )
        pruned = 0
        async with self._db.transaction() as conn:
            for signal, length_s, windows in keep:
                before = now_ms // (length_s * 1000) - windows
                pruned += await store.prune_windows(conn, signal.value, before)
        return pruned

    def event(self, alert: Alert) -> AuditEvent:
        """The ledger entry of an alert: the signal in ``reason``, what crossed which threshold and
        the evidence's leaf indices in ``reason_ids`` (identifiers, kept when payloads are purged)."""
        return AuditEvent(
            type=AuditEventType.SURVEILLANCE_ALERT,
            issuer=self._settings.issuer,
            subject=alert.subject,
            client_id=alert.client_id,
            actor_chain=alert.actor_chain,
            partner=alert.partner,
            transaction_id=alert.transaction_id,
            reason=alert.signal.value,
            reason_ids=alert.reason_ids(),
            service="trustplane.surveillance",
            payload=alert.payload(),
        )
