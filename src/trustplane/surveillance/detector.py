"""The signals, framework-free: given a batch of ledger entries (in index order) and the store,
decide what to raise. State lives in the store (the database), not in the process, and the caller
runs :meth:`Detector.detect` inside the transaction that also appends the alerts and moves the
cursor, so a batch is either wholly seen (alerts and state) or not at all.

- ``unusual_delegation.new_actor_pair``: a token exchange issued a token whose (subject, current
  actor) pair the exchanging client had never produced, once the client is past its learning
  period (``learning`` exchanges).
- ``unusual_delegation.deep_chain``: the ``act`` chain is longer than the absolute
  ``max_chain_depth``, or (past the learning period) longer than the client's deepest so far.
- ``partner.claim_failures``: a partner's assertions were refused for a claim requirement
  (``reason_ids`` in ``claim_reasons``) ``claim_failures`` times or more within one window.
- ``issuance.spike``: a client was issued more than ``max(issuance_floor, issuance_factor x
  baseline)`` tokens in one window, the baseline being its mean per window over the
  ``issuance_baseline_windows`` windows before (a window with nothing counts as 0).

A window alerts at most once (the entry that crossed the threshold is its evidence); a count
exactly at the spike threshold does not alert (it must exceed it), a partner's count reaching
``claim_failures`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit_events import AuditEventType
from trustplane.surveillance.signals import Alert, Observed, Signal, Thresholds
from trustplane.surveillance.store import Delegation, SurveillanceStore, Window

ISSUED = AuditEventType.TOKEN_ISSUED.value
REFUSED = AuditEventType.TOKEN_REFUSED.value


@dataclass
class _Batch:
    """The state one batch touched, read once and written back once at the end."""

    delegations: dict[str, Delegation] = field(default_factory=dict)
    windows: dict[tuple[Signal, str, int], Window] = field(default_factory=dict)
    limits: dict[tuple[Signal, str, int], float] = field(default_factory=dict)


class Detector:
    def __init__(self, store: SurveillanceStore, thresholds: Thresholds) -> None:
        self._store, self._t = store, thresholds

    async def detect(self, conn: AsyncConnection, events: list[Observed]) -> list[Alert]:
        batch, alerts = _Batch(), list[Alert]()
        for event in events:
            if event.type == ISSUED and event.client_id:
                if event.actor_chain:
                    alerts += await self._delegation(conn, batch, event, event.client_id)
                alert = await self._issuance(conn, batch, event, event.client_id)
                alerts += [alert] if alert else []
            elif event.type == REFUSED and event.partner and self._claim_failed(event):
                alert = await self._claim_failure(conn, batch, event, event.partner)
                alerts += [alert] if alert else []
        for client_id, delegation in batch.delegations.items():
            await self._store.save_delegation(conn, client_id, delegation)
        for (signal, key, bucket), window in batch.windows.items():
            await self._store.save_window(conn, signal.value, key, bucket, window)
        return alerts

    # ------------------------------------------------------------------ delegation

    async def _delegation(
        self, conn: AsyncConnection, batch: _Batch, event: Observed, client_id: str
    ) -> list[Alert]:
        known = batch.delegations.get(client_id)
        if known is None:
            known = batch.delegations[client_id] = await self._store.delegation(conn, client_id)
        learned = known.exchanges >= self._t.learning
        depth, actor = len(event.actor_chain), event.actor_chain[0]
        alerts: list[Alert] = []
        fresh = await self._store.add_pair(conn, client_id, event.subject or "", actor, event.index)
        if fresh and learned:
            alerts.append(self._alert(Signal.NEW_ACTOR_PAIR, event, 1, 0))
        if self._t.max_chain_depth and depth > self._t.max_chain_depth:
            alerts.append(self._alert(Signal.DEEP_CHAIN, event, depth, self._t.max_chain_depth))
        elif learned and depth > known.max_depth:
            alerts.append(self._alert(Signal.DEEP_CHAIN, event, depth, known.max_depth))
        known.exchanges += 1
        known.max_depth = max(known.max_depth, depth)
        return alerts

    def _alert(self, signal: Signal, event: Observed, observed: int, threshold: int) -> Alert:
        return Alert(
            signal,
            observed,
            threshold,
            (event.index,),
            client_id=event.client_id,
            subject=event.subject,
            actor_chain=event.actor_chain,
            transaction_id=event.transaction_id,
        )

    # ------------------------------------------------------------------ windows

    def _claim_failed(self, event: Observed) -> bool:
        return not self._t.claim_reasons.isdisjoint(event.reason_ids)

    async def _claim_failure(
        self, conn: AsyncConnection, batch: _Batch, event: Observed, partner: str
    ) -> Alert | None:
        signal, length = Signal.CLAIM_FAILURES, self._t.claim_window_s
        window, bucket = await self._count(conn, batch, signal, partner, event, length)
        if window.alerted_index is not None or window.count < self._t.claim_failures:
            return None
        window.alerted_index = event.index
        return self._window_alert(signal, event, window, self._t.claim_failures, length, bucket)

    async def _issuance(
        self, conn: AsyncConnection, batch: _Batch, event: Observed, client_id: str
    ) -> Alert | None:
        signal, length = Signal.ISSUANCE_SPIKE, self._t.issuance_window_s
        window, bucket = await self._count(conn, batch, signal, client_id, event, length)
        limit = batch.limits.get((signal, client_id, bucket))
        if limit is None:
            limit = await self._spike_limit(conn, batch, client_id, bucket)
            batch.limits[(signal, client_id, bucket)] = limit
        if window.alerted_index is not None or window.count <= limit:
            return None
        window.alerted_index = event.index
        return self._window_alert(signal, event, window, limit, length, bucket)

    async def _count(
        self,
        conn: AsyncConnection,
        batch: _Batch,
        signal: Signal,
        key: str,
        event: Observed,
        length_s: int,
    ) -> tuple[Window, int]:
        """The event's window of ``key``, counted in."""
        bucket = event.time_ms // (length_s * 1000)
        window = batch.windows.get((signal, key, bucket))
        if window is None:
            stored = await self._store.windows(conn, signal.value, key, bucket, bucket)
            window = stored.get(bucket) or Window(0, event.index)
            batch.windows[(signal, key, bucket)] = window
        window.count += 1
        return window, bucket

    async def _spike_limit(
        self, conn: AsyncConnection, batch: _Batch, client_id: str, bucket: int
    ) -> float:
        """max(floor, factor x the client's mean count over the windows before ``bucket``)."""
        span = self._t.issuance_baseline_windows
        signal = Signal.ISSUANCE_SPIKE
        counts = {
            b: w.count
            for b, w in (
                await self._store.windows(conn, signal.value, client_id, bucket - span, bucket - 1)
            ).items()
        }
        for (sig, key, b), window in batch.windows.items():  # this batch's counts not saved yet
            if sig is signal and key == client_id and bucket - span <= b < bucket:
                counts[b] = window.count
        baseline = sum(counts.values()) / span
        return max(float(self._t.issuance_floor), self._t.issuance_factor * baseline)

    def _window_alert(
        self,
        signal: Signal,
        event: Observed,
        window: Window,
        threshold: float,
        length_s: int,
        bucket: int,
    ) -> Alert:
        return Alert(
            signal,
            window.count,
            threshold,
            (window.first_index, event.index),
            client_id=event.client_id if signal is Signal.ISSUANCE_SPIKE else None,
            partner=event.partner,
            transaction_id=event.transaction_id,
            window_s=length_s,
            window_start_ms=bucket * length_s * 1000,
        )
