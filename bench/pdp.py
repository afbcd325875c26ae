#!/usr/bin/env python3
"""Policy decision point benchmarks, printed as one table.

Sections (each a function returning rows; ``SECTIONS`` lists them in order):

- ``section_engine``: raw ``cedarpy.is_authorized`` (pre-parsed PolicySet and Schema, entities as a
  ready JSON string) and our in-process ``decide`` on the SAME request set in the same run, one call
  per decision; the ratio is our overhead (entity conversion, fail-closed mapping, reason ids, the
  audit record built, metrics). Target <= 1.5x.
- ``section_decide_recorded``: ``decide`` with every decision made durable (audit event + decision
  inputs) through the group-commit writer on SQLite, at --concurrency in-flight decisions.
- ``section_simulation``: --sim-records recorded decisions in SQLite replayed against a candidate
  bundle (``trustplane.policy.simulate``): decisions/s and the projected time for 1M. Target <= 180 s.
- ``section_pep``: PEP token validation + in-process decide per request, new and reused tokens, with
  the raw ES256 verify and ``decide`` alone as baselines (``bench/pdp_http.py``). Target p50 <= 250 us
  with a new token per request (issue 15).
- ``section_authzen_http``: AuthZEN single and batch evaluations over HTTP against a real
  ``trustplane serve`` with wrk (``bench/pdp_http.py``).

  python bench/pdp.py                       # defaults: 3,000 decisions, 200,000 recorded
  python bench/pdp.py --sim-records 1000000

Numbers from a shared 2-vCPU machine are indicative; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cedarpy
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trustplane.audit_events import AuditEvent
from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.policy.bundle import BundleSource, CompiledBundle, compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine, cedar_input
from trustplane.policy.recorder import DecisionRecord, DecisionRecorder, write_decisions
from trustplane.policy.simulate import simulate
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade
from trustplane.storage.writer import GroupCommitWriter

REGIONS = ("eu",)


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    per_second: float
    p50_us: float | None = None
    p99_us: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- request set


def _lei(i: int) -> Entity:
    return Entity("LegalEntity", f"LEI{i:017d}")


def request_set(n: int) -> list[DecisionRequest]:
    """A mix of the default bundle's situations: own entity, mandates, large tickets, restricted
    instruments, settlements, reports in and out of region."""
    out: list[DecisionRequest] = []
    for i in range(n):
        a = (i + i % 3) % 50
        owner, actor = _lei(i % 50), _lei(a)
        subject = Entity(
            "Client",
            f"c-{a}-{i % 4}",
            {"legal_entity": actor, "scopes": frozenset({"order:create"})},
            (actor,),
        )
        instrument = Entity(
            "Instrument",
            f"XS{i % 97:010d}",
            {"instrument_class": "bond", "restricted": i % 97 == 0},
        )
        kind = i % 4
        base = {"data_region": "eu" if i % 11 else "us", "delegation_depth": i % 3}
        if kind <= 1:
            resource = Entity(
                "Order",
                f"o-{i}",
                {
                    "owner": owner,
                    "account": Entity("Account", f"A{i % 50}"),
                    "instrument": instrument,
                },
            )
            context: dict[str, Any] = {
                **base,
                "amount_minor": (i * 7_919_993) % 2_000_000_000,
                "currency": "EUR",
                "instrument_class": "bond",
            }
            if i % 5 == 0:
                context["mandate"] = {
                    "id": f"M-{i}",
                    "version": 1,
                    "status": "active",
                    "grantor": owner,
                    "grantee": actor,
                    "max_amount_minor": 1_500_000_000,
                }
            out.append(DecisionRequest(subject, "order:create", resource, context))
        elif kind == 2:
            resource = Entity(
                "Settlement", f"s-{i}", {"owner": owner, "account": Entity("Account", f"A{i % 50}")}
            )
            context = {
                **base,
                "amount_minor": 100 + i,
                "currency": "EUR",
                "trade_state": "executed" if i % 7 else "pending",
            }
            out.append(DecisionRequest(subject, "settlement:submit", resource, context))
        else:
            resource = Entity("Report", f"r-{i}", {"owner": owner})
            out.append(DecisionRequest(subject, "report:view", resource, base))
    return out


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    return ordered[len(ordered) // 2] / 1000, ordered[int(len(ordered) * 0.99)] / 1000


def _timed(fn: Callable[[Any], Any], items: list[Any], rounds: int) -> tuple[float, float, float]:
    samples: list[int] = []
    for _ in range(rounds):
        for item in items:
            t0 = time.perf_counter_ns()
            fn(item)
            samples.append(time.perf_counter_ns() - t0)
    p50, p99 = _percentiles(samples)
    return 1e9 / statistics.fmean(samples), p50, p99


# --------------------------------------------------------------------------- sections


def _ratio(raw_s: float, raw50: float, ours_s: float, ours50: float) -> str:
    return f"{raw_s / ours_s:.2f}x raw by throughput, {ours50 / raw50:.2f}x by p50"


def section_engine(args: argparse.Namespace) -> list[Row]:
    bundle = compile_bundle(default_bundle())
    requests = request_set(args.decisions)
    prepared = []
    for r in requests:
        cedar = cedar_input(r, REGIONS)
        prepared.append((cedar.request, orjson.dumps(list(cedar.entities.values())).decode()))

    def raw(item: tuple[dict[str, Any], str]) -> None:
        cedarpy.is_authorized(item[0], bundle.policies, item[1], schema=bundle.schema)

    engine = PolicyEngine(issuer="https://bench", served_regions=REGIONS)
    engine.activate(bundle)

    async def interleaved() -> tuple[list[int], list[int], list[int]]:
        """Raw, evaluate and ``await decide`` timed back to back on each request inside one running
        loop, so that a load change on a shared machine hits all three alike."""
        raw_ns: list[int] = []
        ev_ns: list[int] = []
        de_ns: list[int] = []
        clock = time.perf_counter_ns
        for _ in range(args.rounds):
            for item, r in zip(prepared, requests, strict=True):
                t0 = clock()
                raw(item)
                t1 = clock()
                engine.evaluate([r])
                t2 = clock()
                await engine.decide(r.subject, r.action, r.resource, r.context)
                raw_ns.append(t1 - t0)
                ev_ns.append(t2 - t1)
                de_ns.append(clock() - t2)
        return raw_ns, ev_ns, de_ns

    raw(prepared[0])
    engine.evaluate(requests[:1])
    raw_ns, ev_ns, de_ns = asyncio.run(interleaved())
    (raw50, raw99), (ev50, ev99), (de50, de99) = map(_percentiles, (raw_ns, ev_ns, de_ns))
    raw_s, ev_s, de_s = (1e9 / statistics.fmean(x) for x in (raw_ns, ev_ns, de_ns))
    allowed = sum(d.allowed for d, _ in engine.evaluate(requests))
    mix = f"{len(requests)} requests, {allowed} allow / {len(requests) - allowed} deny"
    return [
        Row("raw cedarpy.is_authorized (baseline)", raw_s, raw50, raw99, mix),
        Row("engine.evaluate (sync, no write)", ev_s, ev50, ev99, _ratio(raw_s, raw50, ev_s, ev50)),
        Row(
            "await decide (in-process, no recorder)",
            de_s,
            de50,
            de99,
            _ratio(raw_s, raw50, de_s, de50),
        ),
    ]


async def _recorded(args: argparse.Namespace, db_url: str) -> Row:
    db = Database(db_url)
    await upgrade(db)
    writer = GroupCommitWriter(db)
    engine = PolicyEngine(
        issuer="https://bench", served_regions=REGIONS, recorder=DecisionRecorder(writer)
    )
    engine.activate(compile_bundle(default_bundle()))
    writer.start()
    requests = request_set(args.decisions)
    latencies: list[int] = []
    queue = list(requests) * args.rounds

    async def worker() -> None:
        while queue:
            r = queue.pop()
            t0 = time.perf_counter_ns()
            await engine.decide(r.subject, r.action, r.resource, r.context)
            latencies.append(time.perf_counter_ns() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    await writer.stop()
    await db.dispose()
    p50, p99 = _percentiles(latencies)
    note = f"SQLite group commit, {args.concurrency} in flight, {writer.batches} commits"
    return Row("await decide + durable record", len(latencies) / elapsed, p50, p99, note)


def section_decide_recorded(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        return [asyncio.run(_recorded(args, f"sqlite+aiosqlite:///{tmp}/pdp.db"))]


def candidate_bundle() -> BundleSource:
    files = dict(default_bundle().files)
    files["trading.cedar"] = files["trading.cedar"].replace("1000000000", "500000000")
    return BundleSource(files)


async def _fill(db: Database, bundle: CompiledBundle, n: int, base: list[DecisionRequest]) -> None:
    engine = PolicyEngine(issuer="https://bench", served_regions=REGIONS, observe=False)
    engine.activate(bundle)
    templates = [rec for _, rec in engine.evaluate(base)]
    now = time.time_ns() // 1_000_000
    chunk: list[DecisionRecord] = []
    for i in range(n):
        t = templates[i % len(templates)]
        event: AuditEvent = replace(t.event, event_id=os.urandom(16).hex(), time=now + i)
        chunk.append(replace(t, event=event))
        if len(chunk) == 20_000 or i == n - 1:
            async with db.transaction() as conn:
                await write_decisions(conn, chunk)
            chunk = []


async def _simulation(args: argparse.Namespace, db_url: str, workers: int) -> Row:
    db = Database(db_url)
    await upgrade(db)
    live = compile_bundle(default_bundle())
    t0 = time.perf_counter()
    await _fill(db, live, args.sim_records, request_set(2000))
    fill_s = time.perf_counter() - t0
    report = await simulate(db, compile_bundle(candidate_bundle()), workers=workers)
    await db.dispose()
    rate = report.replayed / report.elapsed_s
    note = (
        f"{report.replayed:,} replayed in {report.elapsed_s:.1f}s ({report.flip_count:,} flips); "
        f"1M -> {1_000_000 / rate:.0f}s projected; recording them took {fill_s:.0f}s"
    )
    return Row(f"simulation replay, {workers} process(es)", rate, None, None, note)


def section_simulation(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        if args.sim_workers == 1 or not args.sim_parallel_only:
            rows.append(asyncio.run(_simulation(args, f"sqlite+aiosqlite:///{tmp}/sim1.db", 1)))
        if args.sim_workers > 1:
            url = f"sqlite+aiosqlite:///{tmp}/simN.db"
            rows.append(asyncio.run(_simulation(args, url, args.sim_workers)))
        return rows


def _rows(measured: list[dict[str, Any]]) -> list[Row]:
    return [
        Row(r["name"], r["ops_s"], r["p50_us"], r["p99_us"], r.get("note", "")) for r in measured
    ]


def section_pep(args: argparse.Namespace) -> list[Row]:
    """PEP validate + decide per request (bench/pdp_http.py: baselines and both token modes)."""
    from pdp_http import bench_pep_validate_decide

    return _rows(bench_pep_validate_decide(args.decisions))


def section_authzen_http(args: argparse.Namespace) -> list[Row]:
    """AuthZEN over HTTP against a real server with wrk (bench/pdp_http.py)."""
    from pdp_http import bench_authzen_http

    return _rows(bench_authzen_http(args.http_duration, args.http_connections))


SECTIONS: list[Callable[[argparse.Namespace], list[Row]]] = [
    section_engine,
    section_decide_recorded,
    section_simulation,
    section_pep,
    section_authzen_http,
]


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("measurement", "per second", "p50 us", "p99 us", "note", title="trustplane PDP")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.per_second:,.0f}",
            f"{r.p50_us:,.0f}" if r.p50_us is not None else "-",
            f"{r.p99_us:,.0f}" if r.p99_us is not None else "-",
            r.note,
        )
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=3000, help="request set size")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the request set")
    parser.add_argument("--concurrency", type=int, default=64, help="in-flight recorded decides")
    parser.add_argument(
        "--sim-records", type=int, default=200_000, help="recorded decisions to replay"
    )
    parser.add_argument(
        "--sim-parallel-only", action="store_true", help="skip the one-process simulation run"
    )
    parser.add_argument(
        "--sim-workers", type=int, default=os.cpu_count() or 1, help="simulation processes"
    )
    parser.add_argument("--http-duration", type=int, default=10, help="wrk seconds (AuthZEN)")
    parser.add_argument("--http-connections", type=int, default=16, help="wrk connections")
    parser.add_argument(
        "--only", action="append", default=[], help="run only sections whose name contains this"
    )
    args = parser.parse_args()
    rows: list[Row] = []
    for section in SECTIONS:
        if args.only and not any(o in section.__name__ for o in args.only):
            continue
        rows.extend(section(args))
    print_table(rows)


if __name__ == "__main__":
    main()
