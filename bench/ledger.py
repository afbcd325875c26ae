#!/usr/bin/env python3
"""Audit ledger benchmark, on SQLite and PostgreSQL (issue 4's targets printed beside each number).

1. Sustained appends: ``--writers`` concurrent tasks emit events through the real sink (group-commit
   writer, canonical entry, salted payload commitment, pending insert) for ``--seconds`` while the
   sequencer integrates in the background. Reports appends/s, appends per CPU-second of this process
   (the "per core" figure), p50/p99 acknowledgement latency, and the hot-path cost of building one
   entry next to a plain ``orjson.dumps`` of the event (the baseline of the same run).
2. Integration latency: duration and size of each integration transaction during that run.
3. A log of ``--entries`` (default 1,000,000), built through a BULK PATH: entries and tree nodes are
   computed in Python exactly as the sequencer does and inserted with executemany (SQLite) or COPY
   (PostgreSQL), one signed checkpoint at the end. Said so in the output.
4. Inclusion proof time at that size (random leaves: the nodes of the upper levels from memory, the
   rest in one statement), one after another and from 16 concurrent tasks, with the load average
   and a control (a fixed 0.1 ms CPU step: its p99 is what the load alone adds), the CPU of this
   process per proof (PostgreSQL's own excluded; less sensitive to other load than the wall
   figures); and the extrapolation to 10M (proof length grows with log2 n; the B-tree gains at
   most one level). The upper nodes are read into memory first, as a starting server does.
5. Export (entries -> JSONL file, the format of `trustplane audit export`) and offline verify
   (signature, every leaf hashed from the entry bytes as exported, root, payload commitments)
   throughput in leaves/s, in one process and in one per CPU (as the CLI), with the load average and
   the leaves per CPU-second (less sensitive to other load than the wall figure); baseline in the
   same run: the earlier export shape (entry parsed and re-serialised by the verifier).
6. Transaction query p99 at that size: ``Ledger.search(transaction_id)`` with an inclusion proof per
   event, as ``GET /audit/transactions/{txn}`` does.
7. Proofs during integration (``--backlog N``, 0 leaves it out): N entries are put in the pending
   table (not timed), then the sequencer's round (``Ledger.integrate_all``, as the background loop
   runs it) integrates them, first with no proof asked (the sequencer's own rate), then (after a
   second backlog) while proofs against the checkpoint of before are asked one at a time, and then
   (a third) from 16 tasks. The provers ask back to back, so proofs that need no database take the
   loop's CPU from the sequencer: compare its rate alone, or at the same proofs per second
   (``--proof-rate R``: at most R proofs/s in all, each task on its own schedule).
   Beside them, in the same window: the control
   step, the event loop's lag (a task sleeping 1 ms and timing its overshoot: how long the loop was
   kept from the proof's answer; its worst is the longest the loop was held), the CPU the loop's
   thread spent while each lone proof was asked (the proof's own and whatever ran meanwhile: a
   figure the machine's load does not inflate, unlike the wall times), and the integration's own
   rate (entries/s) so that a gain for proofs is not paid by the sequencer unseen. PostgreSQL: the
   pending table is vacuumed first, as autovacuum would (off on the development server).

  python bench/ledger.py                          # both databases, 1M entries
  python bench/ledger.py --db sqlite --entries 200000 --seconds 5
  python bench/ledger.py --db postgresql --keep /tmp/tp-ledger --pg-name tp_x_ledger
      # builds the log once and keeps it (the SQLite file, or the PostgreSQL database, and the
      # key-encryption key in /tmp/tp-ledger/<db>.json); the same command again skips 1-3 and
      # measures on the kept log. Drop the kept database yourself (DROP DATABASE tp_x_ledger).
  python bench/ledger.py --db postgresql --keep /tmp/tp-ledger --skip 5   # proofs and queries only
  python bench/ledger.py --db postgresql --keep /tmp/tp-ledger --skip 5 --skip 6 --backlog 50000
      # proofs while the sequencer integrates a backlog of 50,000 entries (the log grows by 150k)

Numbers from a shared, loaded 2-vCPU machine are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trustplane.app import Services
from trustplane.audit import merkle
from trustplane.audit.canonical import entry_parts
from trustplane.audit.export_format import export_line
from trustplane.audit.note import Checkpoint
from trustplane.audit.parallel_verify import verify_export_file
from trustplane.audit.sink import SqlAuditSink, pending_row
from trustplane.audit.store import LEAF_COLUMNS, append_pending, insert_integrated
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.keys.crypto import new_kek_text
from trustplane.logging import configure_logging
from trustplane.settings import Settings
from trustplane.startup import freeze_after_start
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

PG_ADMIN = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
TXN_SIZE = 8  # events per transaction in the bulk log
CHUNK = 20_000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def row(name: str, value: str, target: str = "") -> None:
    print(f"  {name:<44} {value:>22}   {target}")


def make_event(n: int, txn: str | None = None) -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.TOKEN_ISSUED,
        issuer="https://as.northwind.example",
        subject=f"client-{n % 997}",
        client_id=f"client-{n % 997}",
        audience="https://execution.example/api",
        scopes=("order:create",),
        jti=secrets.token_urlsafe(16),
        transaction_id=txn or f"txn-{n // TXN_SIZE}",
        decision="allow",
        payload={"grant_type": "client_credentials", "exp": 1_900_000_000 + n},
    )


# --------------------------------------------------------------------------- databases


async def fresh_database(kind: str, tmp: Path, pg_name: str | None = None) -> tuple[str, Any]:
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'ledger.db'}"
        drop = None
    else:
        name = pg_name or f"tp_bench_{os.getpid()}_{secrets.token_hex(3)}"
        admin = create_async_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"

        async def drop() -> None:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await admin.dispose()

    db = Database(url)
    await upgrade(db)
    await db.dispose()
    return url, drop


def settings_for(url: str, tmp: Path, kek: str | None = None) -> Settings:
    return Settings(
        issuer="https://as.northwind.example",
        database_url=url,
        data_dir=tmp,
        key_encryption_key=kek or new_kek_text(),
        log_level="error",
        audit_integrate_interval=0.2,
    )


# --------------------------------------------------------------------------- 1 + 2: appends


async def sustained_appends(svc: Services, writers: int, seconds: float) -> None:
    sink = SqlAuditSink.__new__(SqlAuditSink)  # the sink already registered on svc's writer
    sink._writer = svc.writer
    latencies: list[float] = []
    integrations: list[tuple[float, int]] = []
    stop = time.monotonic() + seconds
    count = 0

    async def writer(w: int) -> None:
        nonlocal count
        n = w
        while time.monotonic() < stop:
            started = time.perf_counter()
            await sink.emit(make_event(n))
            latencies.append(time.perf_counter() - started)
            count += 1
            n += writers

    async def sequencer() -> None:
        while True:
            await asyncio.sleep(svc.settings.audit_integrate_interval)
            while (done := await svc.ledger.integrate()) is not None:
                integrations.append((done.seconds, done.count))

    seq = asyncio.create_task(sequencer())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    seq.cancel()
    await asyncio.gather(seq, return_exceptions=True)
    await svc.ledger.integrate_all()

    events = [make_event(i) for i in range(20_000)]
    t0 = time.perf_counter()
    for e in events:
        entry_parts(e)
    entry_us = (time.perf_counter() - t0) / len(events) * 1e6
    t0 = time.perf_counter()
    for e in events:
        orjson.dumps(e)
    plain_us = (time.perf_counter() - t0) / len(events) * 1e6

    print(f"sustained appends ({writers} concurrent writers, {seconds:g} s, sequencer running):")
    row("appends/s (wall)", f"{count / wall:,.0f}")
    row("appends per CPU-second of this process", f"{count / cpu:,.0f}", ">= 2,500/s per core")
    row(
        "ack latency p50 / p99",
        f"{pct(latencies, 0.5) * 1e3:.1f} / {pct(latencies, 0.99) * 1e3:.1f} ms",
    )
    row("entry build (JCS + salted commitment)", f"{entry_us:.1f} us", "")
    row("baseline: orjson.dumps(event)", f"{plain_us:.1f} us", f"ratio {entry_us / plain_us:.1f}x")
    durations = [d for d, _ in integrations]
    sizes = [c for _, c in integrations]
    print("integration (during the run):")
    row("integrations / entries", f"{len(integrations)} / {sum(sizes):,}")
    row(
        "duration p50 / p99",
        f"{pct(durations, 0.5) * 1e3:.1f} / {pct(durations, 0.99) * 1e3:.1f} ms",
    )
    row(
        "entries per integration p50 / max",
        f"{pct([float(s) for s in sizes], 0.5):.0f} / {max(sizes, default=0)}",
    )
    row(
        "append -> signed checkpoint (upper bound)",
        f"{(svc.settings.audit_integrate_interval + pct(durations, 0.99)) * 1e3:.0f} ms",
        "interval + p99 duration",
    )


# --------------------------------------------------------------------------- 3: bulk 1M


async def bulk_build(svc: Services, entries: int) -> None:
    """Append ``entries`` leaves after the current tree, as the sequencer would, but in bulk."""
    db, ledger = svc.db, svc.ledger
    signer = await ledger.signer()
    await ledger.integrate_all()
    async with db.read() as conn:
        size = (await conn.execute(text("SELECT tree_size FROM audit_log_state"))).scalar() or 0
        ids = merkle.frontier_ids(size)
        frontier = {}
        for i in ids:
            h = (
                await conn.execute(text("SELECT hash FROM audit_tree WHERE id = :i"), {"i": i})
            ).scalar()
            frontier[i] = bytes(h)
    builder = merkle.TreeBuilder(size, frontier)
    started = time.perf_counter()
    now = int(time.time())
    for first in range(0, entries, CHUNK):
        leaves, nodes, payloads = [], [], []
        for n in range(first, min(entries, first + CHUNK)):
            index = builder.size
            entry, payload, salt = entry_parts(make_event(n))
            e = orjson.loads(entry)
            leaves.append(
                (
                    index,
                    entry.decode(),
                    e["event_id"],
                    e["type"],
                    e["time"],
                    e["subject"],
                    e["client_id"],
                    None,
                    e["transaction_id"],
                    now,
                )
            )
            nodes.extend(builder.append(merkle.leaf_hash(entry)))
            payloads.append((index, payload.decode(), salt))
        async with db.transaction() as conn:
            await _bulk_insert(conn, leaves, nodes, payloads)
        if (first // CHUNK) % 10 == 9:
            print(f"  bulk path: {first + len(leaves):,} / {entries:,}", flush=True)
    root = builder.root()
    note = signer.sign(Checkpoint(ledger.origin, builder.size, root).body())
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE audit_log_state SET tree_size = :n, root = :r, updated_at = :t"),
            {"n": builder.size, "r": root, "t": now},
        )
        await conn.execute(
            text(
                "INSERT INTO audit_checkpoints (tree_size, root, note, created_at) VALUES (:n, :r, :note, :t)"
            ),
            {"n": builder.size, "r": root, "note": note, "t": now},
        )
        if svc.db.dialect == "postgresql":
            await conn.execute(text("ANALYZE"))
    await ledger.warm()  # what a server started on this log does first
    print(
        f"\r  built {entries:,} entries through the BULK PATH (not the sequencer) in "
        f"{time.perf_counter() - started:.0f} s; tree size {builder.size:,}"
    )


async def _bulk_insert(conn: Any, leaves: list[Any], nodes: list[Any], payloads: list[Any]) -> None:
    if conn.dialect.name == "postgresql":
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.copy_records_to_table("audit_leaves", records=leaves, columns=LEAF_COLUMNS)
        await raw.copy_records_to_table("audit_tree", records=nodes, columns=("id", "hash"))
        await raw.copy_records_to_table(
            "audit_payloads", records=payloads, columns=("idx", "payload", "salt")
        )
        return
    await insert_integrated(conn, leaves, nodes, payloads)


# --------------------------------------------------------------------------- 4, 5, 6


async def proofs_and_queries(
    svc: Services, tmp: Path, samples: int, skip: frozenset[int] = frozenset()
) -> None:
    ledger = svc.ledger
    latest = await ledger.checkpoint()
    assert latest is not None
    size = latest.size
    times = []
    cpu0 = time.process_time()
    for _ in range(samples):
        index = random.randrange(size)
        t0 = time.perf_counter()
        await ledger.inclusion(index, size)
        times.append(time.perf_counter() - t0)
    single_cpu = (time.process_time() - cpu0) / samples
    p50, p99 = pct(times, 0.5) * 1e3, pct(times, 0.99) * 1e3
    factor = (10_000_000 - 1).bit_length() / max(1, (size - 1).bit_length())
    print(f"at {size:,} entries:")
    row(
        "inclusion proof p50 / p99",
        f"{p50:.2f} / {p99:.2f} ms",
        f"<= 2 ms   (load {os.getloadavg()[0]:.1f})",
    )
    control = cpu_control(samples)
    row(
        "  control: a fixed 0.1 ms CPU step p50 / p99",
        f"{pct(control, 0.5) * 1e3:.2f} / {pct(control, 0.99) * 1e3:.2f} ms",
        "(what the load alone adds)",
    )
    cpu0 = time.process_time()
    concurrent, rate = await concurrent_proofs(ledger, size, samples)
    concurrent_cpu = (time.process_time() - cpu0) / len(concurrent)
    row(
        "  16 concurrent: p50 / p99, proofs/s",
        f"{pct(concurrent, 0.5) * 1e3:.2f} / {pct(concurrent, 0.99) * 1e3:.2f} ms, {rate:,.0f}",
        f"(load {os.getloadavg()[0]:.1f})",
    )
    row(
        "  CPU of this process per proof: 1 / 16 at once",
        f"{single_cpu * 1e6:.0f} / {concurrent_cpu * 1e6:.0f} us",
        "(less sensitive to the load; not the server's)",
    )
    row(
        "extrapolated to 10M (x log2 ratio)",
        f"{p50 * factor:.2f} / {p99 * factor:.2f} ms",
        "<= 2 ms (estimate)",
    )

    if 6 not in skip:
        await transaction_queries(ledger, size, samples)
    if 5 not in skip:
        await export_and_verify(ledger, tmp, latest, size)


async def transaction_queries(ledger: Any, size: int, samples: int) -> None:
    txn_times = []
    for _ in range(samples):
        txn = f"txn-{random.randrange(size // TXN_SIZE)}"
        t0 = time.perf_counter()
        await ledger.search({"transaction_id": txn}, 0, 1000)
        txn_times.append(time.perf_counter() - t0)
    row(
        "transaction query (+ proofs) p50 / p99",
        f"{pct(txn_times, 0.5) * 1e3:.2f} / {pct(txn_times, 0.99) * 1e3:.2f} ms",
        "p99 <= 20 ms",
    )


async def export_and_verify(ledger: Any, tmp: Path, latest: Any, size: int) -> None:
    export = tmp / "export.jsonl"
    t0 = time.perf_counter()
    with export.open("wb") as handle:
        async for item in ledger.iter_entries(0, size, chunk=20_000):
            handle.write(export_line(item))
    export_s = time.perf_counter() - t0
    row("export (DB -> JSONL)", f"{size / export_s:,.0f} leaves/s")
    key = await ledger.verifier_key()
    cpus = os.cpu_count() or 1
    for workers in sorted({1, cpus}):
        rate, cpu_rate, load = timed_verify(export, latest.note, key, workers, size)
        row(
            f"offline verify, {workers} process{'es' if workers > 1 else ''}",
            f"{rate:,.0f} leaves/s",
            f">= 200k leaves/s   (load {load:.1f}; {cpu_rate:,.0f} per CPU-second)",
        )
    # Baseline in the same run: the earlier export shape (entry as a parsed object before the other
    # fields, which the verifier parses and re-serialises per line): what verify did before.
    older = tmp / "older.jsonl"
    with export.open("rb") as src, older.open("wb") as dst:
        for line in src:
            r = orjson.loads(line)
            old = {k: r[k] for k in ("index", "entry", "leaf_hash", "payload", "salt")}
            dst.write(orjson.dumps(old) + b"\n")
    rate, cpu_rate, load = timed_verify(older, latest.note, key, 1, size)
    row(
        "baseline: earlier export shape, 1 process",
        f"{rate:,.0f} leaves/s",
        f"(load {load:.1f}; {cpu_rate:,.0f} per CPU-second)",
    )
    older.unlink()
    export.unlink()


# --------------------------------------------------------------------------- 7: during integration


async def fill_backlog(svc: Services, count: int) -> None:
    """``count`` entries into the pending table (5,000 per transaction), as appends leave them."""
    for first in range(0, count, 5000):
        rows = []
        for n in range(first, min(count, first + 5000)):
            rows.append(pending_row(make_event(n)))  # as the append writes it
        async with svc.db.transaction() as conn:
            await append_pending(conn, rows)


async def loop_lag(until: asyncio.Future[Any], lags: list[float]) -> None:
    """Overshoot of a 1 ms sleep, repeatedly, until ``until`` is done: how long the loop was busy
    with something else when this task was due (a proof's answer waits the same)."""
    while not until.done():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t0 - 0.001)


async def during_integration(svc: Services, backlog: int, rate: float = 0) -> None:
    paced = f", at most {rate:,.0f} proofs/s" if rate else ""
    print(f"proofs while the sequencer integrates a backlog of {backlog:,} entries{paced}:")
    for tasks in (0, 1, 16):
        if svc.db.dialect == "postgresql":
            # what autovacuum does (it is off on the development server): without it the
            # pending table's dead rows of earlier runs (millions) make every read of it walk
            # their index entries, sweeping the buffer cache the proofs read from
            async with svc.db.autocommit_engine.connect() as conn:
                await conn.exec_driver_sql("VACUUM audit_pending")
        await fill_backlog(svc, backlog)
        await _during_one(svc.ledger, tasks, rate)


async def _during_one(ledger: Any, tasks: int, rate: float = 0) -> None:
    """Proofs from ``tasks`` tasks while ``integrate_all`` runs (``rate``: at most that many
    proofs per second in all, each task on its own schedule); one line of figures each."""
    latest = await ledger.checkpoint()
    assert latest is not None
    size = latest.size
    await ledger.inclusion(random.randrange(size), size)  # the right edge of size kept
    times: list[float] = []
    control: list[float] = []
    lags: list[float] = []
    held: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    seq = asyncio.ensure_future(ledger.integrate_all())
    lag = asyncio.ensure_future(loop_lag(seq, lags))

    async def prover() -> None:
        due = time.perf_counter()
        while not seq.done():
            if rate:  # on schedule: the time a proof waits for its slot is not counted
                due += tasks / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            t0, c0 = time.perf_counter(), time.thread_time()
            await ledger.inclusion(random.randrange(size), size)
            times.append(time.perf_counter() - t0)
            if tasks == 1:  # what the loop's thread ran while this proof was asked (the proof too)
                held.append(time.thread_time() - c0)
            if tasks == 1:  # the control step, interleaved with the proofs
                control.extend(cpu_control(1))
            await asyncio.sleep(0)  # as between requests (a SQLite proof may not suspend at all)

    await asyncio.gather(*(prover() for _ in range(tasks)))
    integrated = await seq
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    await lag
    if tasks:
        label = "one at a time" if tasks == 1 else f"{tasks} concurrent"
        row(
            f"  {label}: proofs, p50 / p99",
            f"{len(times):,}, {pct(times, 0.5) * 1e3:.2f} / {pct(times, 0.99) * 1e3:.2f} ms",
            f"<= 2 ms   (load {os.getloadavg()[0]:.1f})",
        )
    else:
        row("  no proofs (the sequencer alone)", "", f"(load {os.getloadavg()[0]:.1f})")
    if control:
        row(
            "    control step in the same window p50 / p99",
            f"{pct(control, 0.5) * 1e3:.2f} / {pct(control, 0.99) * 1e3:.2f} ms",
        )
    if held:
        row(
            "    loop thread's CPU during a proof p50/p99/max",
            f"{pct(held, 0.5) * 1e3:.2f} / {pct(held, 0.99) * 1e3:.2f} / {max(held) * 1e3:.1f} ms",
            "(the proof's and what ran meanwhile: not the load's)",
        )
    row(
        "    event loop lag p50 / p99 / max",
        f"{pct(lags, 0.5) * 1e3:.2f} / {pct(lags, 0.99) * 1e3:.2f} / {max(lags) * 1e3:.1f} ms",
    )
    row(
        "    integration: entries/s, CPU of this process",
        f"{integrated / wall:,.0f}/s, {cpu:.2f} s",
        f"({integrated:,} in {wall:.2f} s)",
    )


def cpu_control(samples: int) -> list[float]:
    """Durations of a fixed pure-CPU step of about 0.1 ms (120 chained SHA-256): its p99 on a
    loaded machine is the scheduling delay any operation meets, the floor under a proof's p99."""
    times = []
    for _ in range(samples):
        t0, h = time.perf_counter(), b""
        for _ in range(120):
            h = hashlib.sha256(h).digest()
        times.append(time.perf_counter() - t0)
    return times


async def concurrent_proofs(ledger: Any, size: int, samples: int) -> tuple[list[float], float]:
    """Latencies of ``samples`` random inclusion proofs asked by 16 tasks at once, and proofs/s."""
    times: list[float] = []

    async def task(count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            await ledger.inclusion(random.randrange(size), size)
            times.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(task(samples // 16) for _ in range(16)))
    return times, len(times) / (time.perf_counter() - started)


def timed_verify(
    path: Path, note: str, key: str, workers: int, size: int
) -> tuple[float, float, float]:
    """(leaves/s wall, leaves per CPU-second of this process and its workers, 1-min load)."""
    before, t0 = os.times(), time.perf_counter()
    report = verify_export_file(path, note, key, workers)
    wall, after = time.perf_counter() - t0, os.times()
    assert report.ok, report.failures
    cpu = sum(
        getattr(after, f) - getattr(before, f)
        for f in ("user", "system", "children_user", "children_system")
    )
    return size / wall, size / max(cpu, 1e-9), os.getloadavg()[0]


async def run(kind: str, args: argparse.Namespace) -> None:
    print(f"\n=== {kind} ===")
    skip = frozenset(args.skip)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        kept = args.keep / f"{kind}.json" if args.keep else None
        if kept is not None and kept.is_file():  # a log kept by an earlier run: 4-6 only
            saved = orjson.loads(kept.read_bytes())
            url, kek, drop, build = saved["url"], saved["kek"], None, False
            print(f"  reusing the log kept in {kept} ({saved['entries']:,} bulk entries)")
        else:
            where = args.keep if kept is not None else tmp
            url, drop = await fresh_database(kind, where, args.pg_name)
            kek, build = new_kek_text(), True
        svc = Services.build(settings_for(url, tmp, kek))
        started = time.perf_counter()
        await svc.start()
        if not build:  # a server started on this log: it reads the nodes it keeps for proofs
            row("server start", f"{time.perf_counter() - started:.2f} s")
            started = time.perf_counter()
            await svc.ledger.warm()  # the lower levels a server reads after it started
            row(
                "  then the tree nodes kept read into memory",
                f"{time.perf_counter() - started:.2f} s",
            )
        freeze_after_start()  # as a server process does once started (trustplane.startup)
        try:
            if build:
                await sustained_appends(svc, args.writers, args.seconds)
                await bulk_build(svc, args.entries)
                if kept is not None:
                    saved = {"url": url, "kek": kek, "entries": args.entries}
                    kept.write_bytes(orjson.dumps(saved))
                    drop = None
            await proofs_and_queries(svc, tmp, args.samples, skip)
            if args.backlog:
                await during_integration(svc, args.backlog, args.proof_rate)
        finally:
            await svc.stop()
            if drop is not None:
                await drop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument(
        "--keep",
        type=Path,
        help="directory: keep the built log there (SQLite file; PostgreSQL database name and the "
        "KEK in <db>.json) and reuse it on the next run (sections 1-3 skipped)",
    )
    parser.add_argument(
        "--pg-name", help="name of the PostgreSQL database to create (default tp_bench_<pid>_<hex>)"
    )
    parser.add_argument(
        "--skip", type=int, action="append", default=[], choices=[5, 6], help="skip section 5 or 6"
    )
    parser.add_argument(
        "--proof-rate",
        type=float,
        default=0,
        help="section 7: at most this many proofs per second in all (0, default: back to back); "
        "compare the sequencer's rate at the same proofs served",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="section 7: proofs while the sequencer integrates this many pending entries "
        "(three times: no proof, one at a time, then 16 at once); 0 (default) leaves it out",
    )
    args = parser.parse_args()
    if args.keep:
        args.keep = args.keep.resolve()
        args.keep.mkdir(parents=True, exist_ok=True)
    configure_logging("error", "console")
    print(f"ledger benchmark: {os.cpu_count()} CPUs (shared and loaded: numbers are indicative)")
    for kind in ["sqlite", "postgresql"] if args.db == "both" else [args.db]:
        asyncio.run(run(kind, args))


if __name__ == "__main__":
    main()
