"""The signals, framework-free: given a batch of ledger entries (in index order) and the store,
decide what to raise. State lives in the store (the database), not in the process.
:meth:`Detector.prepare` works a batch out from reads alone; the caller runs :meth:`Detector.write`
in the transaction that also appends the alerts and moves the cursor (compare-and-set), so a batch
is either wholly seen (alerts and state) or not at all.

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

import asyncio
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.surveillance.signals import (
    ISSUED,
    REFUSED,
    SLICE,
    Alert,
    Observed,
    Signal,
    Thresholds,
)
from trustplane.surveillance.store import (
    Delegation,
    Pair,
    SurveillanceStore,
    Window,
    pair_digest,
)


@dataclass
class _Batch:
    """The state one batch touches, read in one statement per kind before the entries are looked
    at and written back once at the end."""

    delegations: dict[str, Delegation] = field(default_factory=dict)
    new_pairs: list[tuple[Pair, int]] = field(default_factory=list)
    fresh_pairs: set[Pair] = field(default_factory=set)
    windows: dict[tuple[str, str, int], Window] = field(default_factory=dict)
    limits: dict[tuple[str, int], float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Detection:
    """What a batch raised and the state it changed: worked out by :meth:`Detector.prepare` from
    reads alone, written by :meth:`Detector.write` in the round's claimed transaction."""

    alerts: list[Alert]
    new_pairs: list[tuple[Pair, int]]
    delegations: dict[str, Delegation]
    windows: dict[tuple[str, str, int], Window]


class Detector:
    def __init__(self, store: SurveillanceStore, thresholds: Thresholds) -> None:
        self._store, self._t = store, thresholds

    async def prepare(self, conn: AsyncConnection, events: list[Observed]) -> Detection:
        """The batch's alerts and state changes, from the state as ``conn`` reads it (reads only).

        Valid for the cursor position the batch was read from: every change of the state is made
        by a round that also moves the cursor, in one transaction, so if the cursor has not moved
        when the round claims, nothing this read has changed since (the caller checks)."""
        exchanges = [e for e in events if e.type == ISSUED and e.client_id and e.actor_chain]
        issued = [e for e in events if e.type == ISSUED and e.client_id]
        failures = [e for e in events if e.type == REFUSED and e.partner and self._claim_failed(e)]
        batch = await self._load(conn, exchanges, issued, failures)
        alerts: list[Alert] = []
        for offset, event in enumerate(events):
            if offset and not offset % SLICE:
                await asyncio.sleep(0)  # the loop's turn: the requests waiting run
            if event.type == ISSUED and event.client_id:
                if event.actor_chain:
                    alerts += self._delegation(batch, event, event.client_id)
                alerts += self._issuance(batch, event, event.client_id)
            elif event.type == REFUSED and event.partner and self._claim_failed(event):
                alerts += self._claim_failure(batch, event, event.partner)
        return Detection(alerts, batch.new_pairs, batch.delegations, batch.windows)

    async def write(self, conn: AsyncConnection, detection: Detection) -> None:
        """Store what :meth:`prepare` worked out, in the round's claimed transaction."""
        if detection.new_pairs:
            await self._store.add_pairs(conn, detection.new_pairs)
        await self._store.save(conn, detection.delegations, detection.windows)

    async def _load(
        self,
        conn: AsyncConnection,
        exchanges: list[Observed],
        issued: list[Observed],
        failures: list[Observed],
    ) -> _Batch:
        batch = _Batch()
        clients = {e.client_id for e in exchanges if e.client_id}
        batch.delegations = await self._store.delegations(conn, clients)
        first: dict[Pair, int] = {}  # each pair with the leaf that shows it first in the batch
        for event in exchanges:
            first.setdefault((str(event.client_id), _pair(event)), event.index)
        known = await self._store.known_pairs(conn, list(first)) if first else set()
        batch.new_pairs = [(pair, index) for pair, index in first.items() if pair not in known]
        batch.fresh_pairs = {pair for pair, _ in batch.new_pairs}
        span = self._t.issuance_baseline_windows
        for signal, found, length, back in (
            (Signal.ISSUANCE_SPIKE, issued, self._t.issuance_window_s, span),
            (Signal.CLAIM_FAILURES, failures, self._t.claim_window_s, 0),
        ):
            keys = {
                str(e.client_id if signal is Signal.ISSUANCE_SPIKE else e.partner) for e in found
            }
            if not keys:
                continue
            buckets = [e.time_ms // (length * 1000) for e in found]
            stored = await self._store.windows(
                conn, signal.value, keys, min(buckets) - back, max(buckets)
            )
            batch.windows.update({(signal.value, k, b): w for (k, b), w in stored.items()})
        return batch

    # ------------------------------------------------------------------ delegation

    def _delegation(self, batch: _Batch, event: Observed, client_id: str) -> list[Alert]:
        known = batch.delegations.setdefault(client_id, Delegation())
        learned = known.exchanges >= self._t.learning
        depth = len(event.actor_chain)
        alerts: list[Alert] = []
        pair = (client_id, _pair(event))
        if pair in batch.fresh_pairs:
            batch.fresh_pairs.discard(pair)  # new at its first exchange only
            if learned:
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

    def _claim_failure(self, batch: _Batch, event: Observed, partner: str) -> list[Alert]:
        signal, length = Signal.CLAIM_FAILURES, self._t.claim_window_s
        window, bucket = self._count(batch, signal, partner, event, length)
        if window.alerted_index is not None or window.count < self._t.claim_failures:
            return []
        window.alerted_index = event.index
        return [self._window_alert(signal, event, window, self._t.claim_failures, length, bucket)]

    def _issuance(self, batch: _Batch, event: Observed, client_id: str) -> list[Alert]:
        signal, length = Signal.ISSUANCE_SPIKE, self._t.issuance_window_s
        window, bucket = self._count(batch, signal, client_id, event, length)
        limit = batch.limits.get((client_id, bucket))
        if limit is None:
            limit = batch.limits[(client_id, bucket)] = self._spike_limit(batch, client_id, bucket)
        if window.alerted_index is not None or window.count <= limit:
            return []
        window.alerted_index = event.index
        return [self._window_alert(signal, event, window, limit, length, bucket)]

    def _count(
        self, batch: _Batch, signal: Signal, key: str, event: Observed, length_s: int
    ) -> tuple[Window, int]:
        """The event's window of ``key``, counted in."""
        bucket = event.time_ms // (length_s * 1000)
        window = batch.windows.setdefault((signal.value, key, bucket), Window(0, event.index))
        window.count += 1
        return window, bucket

    def _spike_limit(self, batch: _Batch, client_id: str, bucket: int) -> float:
        """max(floor, factor x the client's mean count over the windows before ``bucket``): the
        batch holds every stored window in that range (loaded) and this batch's own counts."""
        span, signal = self._t.issuance_baseline_windows, Signal.ISSUANCE_SPIKE.value
        total = sum(
            batch.windows[(signal, client_id, b)].count
            for b in range(bucket - span, bucket)
            if (signal, client_id, b) in batch.windows
        )
        return max(float(self._t.issuance_floor), self._t.issuance_factor * total / span)

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


def _pair(event: Observed) -> str:
    return pair_digest(event.subject or "", event.actor_chain[0])
