#!/usr/bin/env python3
"""Token exchange against client_credentials in process: ``TokenEndpoint.handle`` called directly
(no HTTP, no wrk), ``--concurrency`` requests in flight, the two grants alternated in blocks in the
same process. Per block: CPU per request (``time.process_time``: this process's threads, the
group-commit writer's included), on PostgreSQL also the CPU of the database's server processes
serving this bench's database (``pg``: their ``/proc/<pid>/stat`` utime + stime; PostgreSQL must
run on this machine), the bytes this process wrote (``written``: ``wchar`` of ``/proc/self/io``, on
SQLite the WAL frames and checkpoints), and the cyclic collector's collections and pause per request
by generation (``gc.callbacks``).

Diagnosis modes (one block of each grant, then exit):

- ``--young``: what is young and alive when generation 0 reaches its threshold (counted on the event
  loop's thread with the collector paused; per collection), i.e. what each grant keeps in flight;
- ``--garbage``: what each grant leaves as cyclic garbage (``DEBUG_SAVEALL``; none, for both);
- ``--growth``: what stays alive after a block (long-lived growth; none beyond the requests in
  flight at its end);
- ``--writer``: the SQLite group-commit writer's batches (wall and thread CPU per request, and its
  statements' share);
- ``--handle``: the grants' ``handle()`` alone, sequential, thread CPU (min and median of blocks).

Run from the repository root with the tests on the path (it builds its server as the tests do):

  PYTHONPATH=src:. python bench/exchange_inproc.py --blocks 6 --requests 1500
  PYTHONPATH=src:. python bench/exchange_inproc.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
  PYTHONPATH=src:. python bench/exchange_inproc.py --young
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import secrets
import statistics
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import EXECUTION, make_settings, register_kit
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.protocol.form import Form
from trustplane.services import Services
from trustplane.startup import freeze_after_start
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

ACCESS = "urn:ietf:params:oauth:token-type:access_token"
GC_CALLS: dict[int, list[float]] = collections.defaultdict(list)
_START = [0.0]


def _gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _START[0] = time.perf_counter()
    else:
        GC_CALLS[info["generation"]].append(time.perf_counter() - _START[0])


async def _database(admin: str) -> tuple[str, str | None]:
    if not admin:
        path = Path(tempfile.mkdtemp(prefix="tp-exch-")) / "trustplane.db"
        url = f"sqlite+aiosqlite:///{path}"
        name = None
    else:
        name = f"tp_exch_{os.getpid()}_{secrets.token_hex(3)}"
        conn = await asyncpg.connect(admin)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        url = "postgresql+asyncpg://" + admin.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
    db = Database(url)
    await upgrade(db)
    await db.dispose()
    return url, name


async def _pg_seconds(admin: str, name: str | None) -> float:
    """CPU seconds used so far by the PostgreSQL backends connected to database ``name`` (0 on
    SQLite, or if their ``/proc`` entries cannot be read: PostgreSQL elsewhere)."""
    if not name:
        return 0.0
    conn = await asyncpg.connect(admin)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
    finally:
        await conn.close()
    return sum(_ticks(row["pid"]) for row in rows) / os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int:
    """utime + stime of a process (fields 14 and 15 of ``/proc/<pid>/stat``); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _written() -> int:
    """Bytes this process has passed to ``write()`` so far (``wchar`` of ``/proc/self/io``: the
    SQLite file's WAL frames and checkpoints; 0 where it cannot be read)."""
    try:
        with open("/proc/self/io") as io:
            fields = dict(line.split(": ", 1) for line in io.read().splitlines())
    except OSError:
        return 0
    return int(fields.get("wchar", 0))


async def _drop(admin: str, name: str | None) -> None:
    if name:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def _forms(kit: Any, grant: str, n: int, subjects: list[str]) -> list[Form]:
    forms = []
    for i in range(n):
        single = {"grant_type": grant, "scope": "order:create", **kit.auth()}
        if grant == TOKEN_EXCHANGE:
            single["subject_token"] = subjects[i % len(subjects)]
            single["subject_token_type"] = ACCESS
        forms.append(Form(single, {"resource": [EXECUTION]}))
    return forms


async def _block(services: Services, forms: list[Form], concurrency: int) -> tuple[float, int]:
    endpoint = services.token_endpoint
    queue = iter(forms)

    async def worker() -> None:
        for form in queue:
            await endpoint.handle(form, None)

    GC_CALLS.clear()
    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - cpu, len(forms)


def _name(obj: object) -> str:
    name = type(obj).__name__
    if isinstance(obj, types.FrameType):
        return f"frame {obj.f_code.co_qualname}"
    if isinstance(obj, types.FunctionType):
        return f"function {obj.__qualname__}"
    if isinstance(obj, dict):
        return "dict(" + ",".join(sorted(map(str, obj))[:6]) + ")"
    if isinstance(obj, tuple | list):
        return f"{name}[{len(obj)}] " + ",".join(type(o).__name__ for o in obj[:4])
    return name


def _census() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(_name(o) for o in gc.get_objects())


async def _young_block(
    services: Services, forms: list[Form], concurrency: int, young: collections.Counter[str]
) -> int:
    """Like :func:`_block` with the collector paused: whenever gen 0 reaches its threshold, its
    objects are counted (on the event loop's thread) and gen 0 is collected."""
    endpoint = services.token_endpoint
    queue = iter(forms)
    threshold = gc.get_threshold()[0]
    seen = [0]

    async def worker() -> None:
        for form in queue:
            await endpoint.handle(form, None)
            if gc.get_count()[0] > threshold:
                seen[0] += 1
                young.update(_name(o) for o in gc.get_objects(0))
                gc.collect(0)

    gc.collect()
    gc.disable()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        gc.enable()
    return seen[0]


def _time_writer() -> list[tuple[str, float, float, int]]:
    """Wrap the SQLite writer's transaction (and some of its statements) to note wall and thread
    CPU time per batch."""
    from trustplane.grant import outcomes
    from trustplane.ssf import receiver
    from trustplane.storage.writer import GroupCommitWriter

    out: list[tuple[str, float, float, int]] = []
    transact = GroupCommitWriter._transact

    def timed(self: Any, steps: Any) -> Any:
        w, c = time.perf_counter(), time.thread_time()
        try:
            return transact(self, steps)
        finally:
            size = sum(len(p) for _, p in steps)
            out.append(("batch", time.perf_counter() - w, time.thread_time() - c, size))

    GroupCommitWriter._transact = timed  # type: ignore[method-assign]

    def part(module: Any, attr: str) -> None:
        fn = getattr(module, attr)

        async def wrapped(*a: Any, **k: Any) -> Any:
            w, c = time.perf_counter(), time.thread_time()
            try:
                return await fn(*a, **k)
            finally:
                out.append((attr, time.perf_counter() - w, time.thread_time() - c, 0))

        setattr(module, attr, wrapped)

    part(receiver, "insert_derivations")
    part(outcomes, "revoked_among")
    part(outcomes, "write_events")
    part(outcomes, "write_inputs")
    part(outcomes, "consume_batch")
    return out


def _garbage_census(label: str) -> None:
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    gc.set_debug(0)
    garbage = list(gc.garbage)
    gc.garbage.clear()
    by_type: collections.Counter[str] = collections.Counter()
    for obj in garbage:
        name = type(obj).__name__
        if isinstance(obj, types.FrameType):
            name = f"frame {obj.f_code.co_qualname}"
        elif isinstance(obj, types.FunctionType):
            name = f"function {obj.__qualname__}"
        elif isinstance(obj, types.CoroutineType):
            name = f"coroutine {obj.__qualname__}"
        elif isinstance(obj, types.CellType):
            name = "cell"
        elif isinstance(obj, BaseException):
            name = f"exception {type(obj).__qualname__}"
        elif isinstance(obj, dict):
            name = "dict(" + ",".join(sorted(map(str, obj))[:6]) + ")"
        by_type[name] += 1
    print(f"{label}: {len(garbage)} cyclic garbage objects")
    for name, count in by_type.most_common(25):
        print(f"  {count:7d}  {name[:110]}")
    del garbage


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--database-url", default="", help="PostgreSQL admin URL (a fresh db is made)")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--subject-tokens", type=int, default=256)
    ap.add_argument("--garbage", action="store_true")
    ap.add_argument("--handle", action="store_true", help="the grants' handle() alone, sequential")
    ap.add_argument("--writer", action="store_true", help="the SQLite writer's batches: wall, CPU")
    ap.add_argument(
        "--young", action="store_true", help="what is young and alive at each gen-0 collection"
    )
    ap.add_argument(
        "--growth", action="store_true", help="what stays alive after each grant's block"
    )
    args = ap.parse_args()
    url, name = await _database(args.database_url)
    data_dir = Path(tempfile.mkdtemp(prefix="tp-exch-data-"))
    services = Services.build(make_settings(url, data_dir, log_level="error"))
    await services.start()
    try:
        kit = await register_kit(services, grant_types=["client_credentials", TOKEN_EXCHANGE])
        subjects = []
        for form in _forms(kit, "client_credentials", args.subject_tokens, []):
            subjects.append((await services.token_endpoint.handle(form, None))["access_token"])
        grants = {"client_credentials": "client_credentials", "exchange": TOKEN_EXCHANGE}
        for grant in grants.values():  # warm up
            await _block(services, _forms(kit, grant, 300, subjects), args.concurrency)
        freeze_after_start()
        gc.callbacks.append(_gc)
        if args.handle:
            endpoint = services.token_endpoint
            form = _forms(kit, "client_credentials", 1, subjects)[0]
            auth = await endpoint._auth.authenticate(form, None, defer_replay=True)
            best: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(args.blocks):
                for label, grant in grants.items():
                    forms = _forms(kit, grant, 200, subjects)
                    handler = endpoint._grants[grant]
                    t = time.thread_time()
                    for form in forms:
                        await handler.handle(form, auth)
                    best[label].append((time.thread_time() - t) / len(forms) * 1e6)
            for label, values in best.items():
                print(
                    f"  {label:<18} handle() min {min(values):6.1f} us  median "
                    f"{statistics.median(values):6.1f} us  ({args.blocks} blocks of 200)"
                )
            print(f"  load {os.getloadavg()}")
            return
        if args.writer:
            batches = _time_writer()
            for block in range(args.blocks):
                for label, grant in grants.items():
                    batches.clear()
                    forms = _forms(kit, grant, args.requests, subjects)
                    cpu, n = await _block(services, forms, args.concurrency)
                    rows = [b for b in batches if b[0] == "batch"]
                    wall = sum(b[1] for b in rows) / n * 1e6
                    tcpu = sum(b[2] for b in rows) / n * 1e6
                    size = statistics.mean(b[3] for b in rows)
                    parts = collections.defaultdict(float)
                    for b in batches:
                        if b[0] != "batch":
                            parts[b[0]] += b[2] / n * 1e6
                    extra = " ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items()))
                    print(
                        f"block {block} {label:<18} cpu {cpu / n * 1e6:6.0f} us/req  writer wall "
                        f"{wall:5.1f} us/req, thread cpu {tcpu:5.1f} us/req, batch {size:4.1f}  "
                        f"[{extra}]  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
            return
        if args.young:
            for label, grant in grants.items():
                forms = _forms(kit, grant, args.requests, subjects)
                young: collections.Counter[str] = collections.Counter()
                seen = await _young_block(services, forms, args.concurrency, young)
                print(f"{label} x{args.requests}: {seen} gen-0 collections, per collection:")
                for key, count in young.most_common(60):
                    print(f"  {count / max(seen, 1):8.1f}  {key[:110]}")
            return
        if args.growth:
            for label, grant in grants.items():
                forms = _forms(kit, grant, args.requests, subjects)
                before = _census()
                await _block(services, forms, args.concurrency)
                del forms
                after = _census()
                grown = after - before
                print(f"{label} x{args.requests}: {sum(grown.values())} more tracked objects")
                for key, count in grown.most_common(20):
                    print(f"  {count:7d}  {key[:110]}")
            return
        if args.garbage:
            gc.collect()
            for label, grant in grants.items():
                forms = _forms(kit, grant, args.requests, subjects)
                gc.collect()
                gc.disable()
                await _block(services, forms, args.concurrency)
                del forms
                _garbage_census(f"{label} x{args.requests}")
                gc.enable()
            return
        rows: dict[str, list[tuple[float, ...]]] = collections.defaultdict(list)
        for block in range(args.blocks):
            order = list(grants.items())
            if block % 2:
                order.reverse()
            for label, grant in order:
                forms = _forms(kit, grant, args.requests, subjects)
                pg = await _pg_seconds(args.database_url, name)
                written = _written()
                cpu, n = await _block(services, forms, args.concurrency)
                written = _written() - written
                pg = await _pg_seconds(args.database_url, name) - pg
                counts = [len(GC_CALLS[g]) for g in range(3)]
                pause = [sum(GC_CALLS[g]) for g in range(3)]
                row = (cpu / n * 1e6, *(c / n * 1000 for c in counts), sum(pause) / n * 1e6)
                rows[label].append((*row, pg / n * 1e6, written / n / 1024))
                print(
                    f"block {block} {label:<18} cpu {row[0]:7.0f} us/req  pg {pg / n * 1e6:5.0f} "
                    f"us/req  written {written / n / 1024:5.1f} KB/req  gc per 1000 req gen0 {row[1]:5.1f} gen1 {row[2]:4.1f} gen2 "
                    f"{row[3]:4.2f}  gc pause {row[4]:5.1f} us/req  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        print("medians:")
        for label, values in rows.items():
            cpu = statistics.median(r[0] for r in values)
            g0 = statistics.median(r[1] for r in values)
            pause = statistics.median(r[4] for r in values)
            pg = statistics.median(r[5] for r in values)
            kb = statistics.median(r[6] for r in values)
            print(
                f"  {label:<18} cpu {cpu:7.0f} us/req  pg {pg:5.0f} us/req  written {kb:5.1f} KB/req  "
                f"gen0/1000 {g0:5.1f}  gc {pause:5.1f} us/req"
            )
        ex = statistics.median(r[0] for r in rows["exchange"])
        cc = statistics.median(r[0] for r in rows["client_credentials"])
        print(f"  cpu ratio exchange/cc {ex / cc:.3f}   load {os.getloadavg()}")
    finally:
        await services.stop()
        await _drop(args.database_url, name)


if __name__ == "__main__":
    asyncio.run(main())
