"""Simulation: replay recorded decisions against a candidate bundle and report what would change.

Each recorded decision stored its Cedar request and entities (``policy_decisions.inputs``), so the
replay evaluates exactly what the live decision saw, against the candidate's policies and schema.
Requests are evaluated in ``cedarpy.is_authorized_batch`` calls over batches whose entity sets agree
(one call per up to 1,000 decisions), and records are streamed from the database in chunks, so memory
stays flat whatever the number of records.

A flip is a decision whose allow/deny changes: allow->deny (the candidate would break a flow that
works today) or deny->allow (it would open one). The responsible reason ids are the candidate's:
the forbids (or ``default_deny``, or a fail-closed reason) for allow->deny, the permits for
deny->allow.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.policy.bundle import BundleSource, CompiledBundle, compile_bundle
from trustplane.policy.engine import CedarInput, evaluate_inputs
from trustplane.policy.tables import policy_decisions
from trustplane.storage.db import Database

CHUNK = 5000
ALLOW_TO_DENY, DENY_TO_ALLOW = "allow_to_deny", "deny_to_allow"


@dataclass(frozen=True, slots=True)
class Recorded:
    decision_id: str
    time_ms: int
    action: str
    principal: str
    resource: str
    allowed: bool
    reason_ids: tuple[str, ...]
    inputs: str | None


@dataclass
class SimulationReport:
    candidate_version: str
    examples_per_direction: int = 5
    total: int = 0
    replayed: int = 0
    skipped: int = 0
    unchanged: int = 0
    reasons_changed: int = 0
    flips: dict[str, int] = field(default_factory=lambda: {ALLOW_TO_DENY: 0, DENY_TO_ALLOW: 0})
    by_reason: dict[str, Counter[str]] = field(
        default_factory=lambda: {ALLOW_TO_DENY: Counter(), DENY_TO_ALLOW: Counter()}
    )
    examples: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {ALLOW_TO_DENY: [], DENY_TO_ALLOW: []}
    )
    elapsed_s: float = 0.0

    @property
    def flip_count(self) -> int:
        return self.flips[ALLOW_TO_DENY] + self.flips[DENY_TO_ALLOW]

    @property
    def flip_rate(self) -> float:
        return self.flip_count / self.replayed if self.replayed else 0.0

    def exceeds(self, max_flips: int | None, max_flip_rate: float | None) -> bool:
        """True when a CI gate should fail: more flips than allowed (count or rate)."""
        if max_flips is not None and self.flip_count > max_flips:
            return True
        return max_flip_rate is not None and self.flip_rate > max_flip_rate

    def merge(self, other: SimulationReport) -> None:
        """Add a partial report (from another worker) to this one."""
        for name in ("total", "replayed", "skipped", "unchanged", "reasons_changed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for direction in (ALLOW_TO_DENY, DENY_TO_ALLOW):
            self.flips[direction] += other.flips[direction]
            self.by_reason[direction].update(other.by_reason[direction])
            room = self.examples_per_direction - len(self.examples[direction])
            self.examples[direction].extend(other.examples[direction][: max(0, room)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate_version": self.candidate_version,
            "total": self.total,
            "replayed": self.replayed,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "reasons_changed": self.reasons_changed,
            "flips": dict(self.flips),
            "flip_count": self.flip_count,
            "flip_rate": self.flip_rate,
            "by_reason": {k: dict(v.most_common()) for k, v in self.by_reason.items()},
            "examples": self.examples,
            "elapsed_s": round(self.elapsed_s, 3),
            "decisions_per_second": round(self.replayed / self.elapsed_s) if self.elapsed_s else 0,
        }


class Simulator:
    """Feed recorded decisions in chunks; read the report at the end."""

    def __init__(self, candidate: CompiledBundle, *, examples: int = 5) -> None:
        self._candidate = candidate
        self.report = SimulationReport(candidate.version, examples)
        self._started = time.perf_counter()

    def feed(self, rows: Sequence[Recorded]) -> None:
        report = self.report
        report.total += len(rows)
        inputs: list[CedarInput | None] = []
        for row in rows:
            if row.inputs is None:
                inputs.append(None)
                continue
            data = orjson.loads(row.inputs)
            entities = {(e["uid"]["type"], e["uid"]["id"]): e for e in data["entities"]}
            inputs.append(CedarInput(data["request"], entities))
        outcomes = evaluate_inputs(self._candidate, inputs)
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome is None:
                report.skipped += 1
                continue
            report.replayed += 1
            reasons = (outcome.failure.value,) if outcome.failure else outcome.reason_ids
            if outcome.allowed == row.allowed:
                report.unchanged += 1
                if tuple(sorted(reasons)) != tuple(sorted(row.reason_ids)):
                    report.reasons_changed += 1
                continue
            self._flip(row, reasons, ALLOW_TO_DENY if row.allowed else DENY_TO_ALLOW)
        report.elapsed_s = time.perf_counter() - self._started

    def _flip(self, row: Recorded, reasons: tuple[str, ...], direction: str) -> None:
        report = self.report
        report.flips[direction] += 1
        report.by_reason[direction].update(reasons)
        if len(report.examples[direction]) < report.examples_per_direction:
            report.examples[direction].append(
                {
                    "decision_id": row.decision_id,
                    "time_ms": row.time_ms,
                    "principal": row.principal,
                    "action": row.action,
                    "resource": row.resource,
                    "recorded_reason_ids": list(row.reason_ids),
                    "candidate_reason_ids": list(reasons),
                }
            )


def _query(since_ms: int | None, until_ms: int | None) -> Any:
    c = policy_decisions.c
    query = select(
        c.decision_id,
        c.time_ms,
        c.action,
        c.principal,
        c.resource,
        c.allowed,
        c.reason_ids,
        c.inputs,
    )
    if since_ms is not None:
        query = query.where(c.time_ms >= since_ms)
    if until_ms is not None:
        query = query.where(c.time_ms < until_ms)
    return query


async def count_recorded(
    conn: AsyncConnection, since_ms: int | None, until_ms: int | None = None
) -> int:
    inner = _query(since_ms, until_ms).subquery()
    return int((await conn.execute(select(func.count()).select_from(inner))).scalar() or 0)


async def recorded_chunks(
    conn: AsyncConnection,
    since_ms: int | None,
    until_ms: int | None = None,
    limit: int | None = None,
) -> AsyncIterator[list[Recorded]]:
    """Recorded decisions, oldest first, in chunks (a server-side cursor on PostgreSQL)."""
    query = _query(since_ms, until_ms).order_by(policy_decisions.c.time_ms)
    if limit is not None:
        query = query.limit(limit)
    result = await conn.stream(query.execution_options(yield_per=CHUNK))
    async for partition in result.partitions(CHUNK):
        yield [
            Recorded(r[0], r[1], r[2], r[3], r[4], bool(r[5]), tuple(r[6].split()), r[7])
            for r in partition
        ]


async def simulate(
    db: Database,
    candidate: CompiledBundle,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    limit: int | None = None,
    examples: int = 5,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> SimulationReport:
    """Replay recorded decisions (optionally from ``since_ms``) against ``candidate``.

    ``workers > 1`` evaluates chunks in that many worker processes (the engine holds the GIL while
    it evaluates, so threads would not help); the database is read by this process meanwhile."""
    started = time.perf_counter()
    if workers <= 1:
        simulator = Simulator(candidate, examples=examples)
        async with db.read() as conn:
            async for chunk in recorded_chunks(conn, since_ms, until_ms, limit):
                await asyncio.to_thread(simulator.feed, chunk)  # keep a serving loop responsive
                if progress is not None:
                    progress(len(chunk))
        report = simulator.report
    else:
        report = await _simulate_parallel(
            db, candidate, since_ms, until_ms, limit, examples, workers, progress
        )
    report.elapsed_s = time.perf_counter() - started
    return report


async def _simulate_parallel(
    db: Database,
    candidate: CompiledBundle,
    since_ms: int | None,
    until_ms: int | None,
    limit: int | None,
    examples: int,
    workers: int,
    progress: Callable[[int], None] | None,
) -> SimulationReport:
    report = SimulationReport(candidate.version, examples)
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    files = dict(candidate.source.files)
    with ProcessPoolExecutor(workers, context, _init_worker, (files, examples)) as pool:
        pending: set[asyncio.Future[tuple[int, SimulationReport]]] = set()

        def collect(done: set[asyncio.Future[tuple[int, SimulationReport]]]) -> None:
            for future in done:
                size, partial = future.result()
                report.merge(partial)
                if progress is not None:
                    progress(size)

        async with db.read() as conn:
            async for chunk in recorded_chunks(conn, since_ms, until_ms, limit):
                pending.add(loop.run_in_executor(pool, _feed_in_worker, chunk))
                if len(pending) >= 2 * workers:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    collect(done)
        if pending:
            done, _ = await asyncio.wait(pending)
            collect(done)
    return report


_worker_bundle: CompiledBundle | None = None
_worker_examples = 5


def _init_worker(files: dict[str, str], examples: int) -> None:
    global _worker_bundle, _worker_examples
    _worker_bundle = compile_bundle(BundleSource(files))
    _worker_examples = examples


def _feed_in_worker(rows: list[Recorded]) -> tuple[int, SimulationReport]:
    assert _worker_bundle is not None
    simulator = Simulator(_worker_bundle, examples=_worker_examples)
    simulator.feed(rows)
    return len(rows), simulator.report
