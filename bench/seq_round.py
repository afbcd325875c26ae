#!/usr/bin/env python3
"""The sequencer's cost per round, in one process, on PostgreSQL (or SQLite with ``--db sqlite``).

For each batch size N (``--sizes``, default 5, 64, 2048): ``--rounds`` times, N entries are put in
the pending table (not timed), then one round of the sequencer (``Ledger.integrate_all``, as the
background loop runs it) integrates them. Printed per N: the CPU of this process per round and per
entry (median over the rounds), the PostgreSQL backends' CPU per round (the server's share, from
``/proc`` of this database's backends), and the statements sent per round (asyncpg's query logger
on every pooled connection). Then the idle cost: the sequencer loop (``Ledger.run``) with nothing
appended for ``--idle`` seconds, this process's CPU per second against the same wait without it.

    python bench/seq_round.py --pg-name tp_seq_micro     # creates, uses and drops that database

Run it alternated with an old tree (PYTHONPATH at its src) and print the load: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from trustplane.app import Services
from trustplane.audit.sink import pending_row
from trustplane.audit.store import append_pending
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.keys.crypto import new_kek_text
from trustplane.logging import configure_logging
from trustplane.settings import Settings
from trustplane.startup import freeze_after_start
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

PG_ADMIN = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
TICKS = os.sysconf("SC_CLK_TCK")


def make_event(n: int) -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.TOKEN_ISSUED,
        issuer="https://as.northwind.example",
        subject=f"client-{n % 997}",
        client_id=f"client-{n % 997}",
        audience="https://execution.example/api",
        scopes=("order:create",),
        jti=f"jti-{n}-{os.getpid()}",
        transaction_id=f"txn-{n // 4}",
        decision="allow",
        payload={"grant_type": "client_credentials", "exp": 1_900_000_000 + n},
    )


async def backends_cpu(db: Database, name: str) -> float:
    """CPU seconds of this database's backends so far (the server's share of the work)."""
    async with db.autocommit_engine.connect() as conn:
        pids = [
            int(r[0])
            for r in (
                await conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE datname = :n"), {"n": name}
                )
            ).all()
        ]
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:  # noqa: ASYNC230 - procfs, no disk
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


async def fill(db: Database, count: int, base: int) -> None:
    rows = []
    for n in range(base, base + count):
        rows.append(pending_row(make_event(n)))  # as the append writes it
    async with db.transaction() as conn:
        await append_pending(conn, rows)


def _count_prepared(sent: list[str]) -> None:
    """Statements SQLAlchemy runs through asyncpg's prepared statements and COPYs (the query
    logger sees only the connection's own execute and fetch calls)."""
    import asyncpg.connection
    import asyncpg.prepared_stmt

    cls: Any = asyncpg.prepared_stmt.PreparedStatement
    plain = cls._PreparedStatement__do_execute

    async def counted(self: Any, executor: Any) -> Any:
        sent.append(self.get_query())
        return await plain(self, executor)

    cls._PreparedStatement__do_execute = counted
    conn_cls: Any = asyncpg.connection.Connection
    for method in ("copy_records_to_table", "copy_to_table"):
        original = getattr(conn_cls, method)

        async def copied(self: Any, *a: Any, _o: Any = original, **k: Any) -> Any:
            sent.append("COPY")
            return await _o(self, *a, **k)

        setattr(conn_cls, method, copied)


async def main_async(args: argparse.Namespace) -> None:
    name = args.pg_name
    tmp = Path(tempfile.mkdtemp(prefix="seq-round-"))
    if args.db == "postgresql":
        admin = create_async_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'ledger.db'}"
    db = Database(url)
    await upgrade(db)
    await db.dispose()
    settings = Settings(
        issuer="https://as.northwind.example",
        database_url=url,
        data_dir=tmp,
        key_encryption_key=new_kek_text(),
        log_level="error",
        audit_integrate_interval=0.2,
    )
    svc = Services.build(settings)
    sent: list[str] = []
    if args.db == "postgresql":

        def attach(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.driver_connection.add_query_logger(lambda r: sent.append(r.query))

        for engine in (svc.db.engine, svc.db.autocommit_engine):
            sa_event.listen(engine.sync_engine, "connect", attach)
    _count_prepared(sent)
    await svc.start()
    freeze_after_start()
    ledger = svc.ledger
    try:
        base = 0
        await fill(svc.db, 20_000, base)  # a tree to grow (frontier reads of a real depth)
        base += 20_000
        await ledger.integrate_all()
        print(
            f"load {os.getloadavg()[0]:.2f}  (db {args.db}, src {sys.modules['trustplane'].__file__})"
        )
        for size in args.sizes:
            cpu, server, stmts = [], [], []
            for _ in range(args.rounds):
                if args.db == "postgresql":
                    async with svc.db.autocommit_engine.connect() as conn:
                        await conn.exec_driver_sql("VACUUM audit_pending")
                await fill(svc.db, size, base)
                base += size
                s0 = await backends_cpu(svc.db, name) if args.db == "postgresql" else 0.0
                del sent[:]
                c0 = time.process_time()
                done = await ledger.integrate_all()
                c1 = time.process_time()
                stmts.append(len(sent))
                s1 = await backends_cpu(svc.db, name) if args.db == "postgresql" else 0.0
                assert done == size, (done, size)
                cpu.append(c1 - c0)
                server.append(s1 - s0)
            med = statistics.median(cpu)
            print(
                f"round of {size:>5}: client CPU {med * 1e3:7.2f} ms/round "
                f"({med / size * 1e6:6.1f} us/entry; min {min(cpu) / size * 1e6:.1f}), "
                f"server CPU {sum(server) / len(server) * 1e3:6.1f} ms/round (mean), "
                f"statements {statistics.median(stmts):.0f}/round   load {os.getloadavg()[0]:.2f}"
            )
        c0 = time.process_time()
        for _ in range(200):
            await ledger.integrate_all()
        print(f"a round with nothing pending: {(time.process_time() - c0) / 200 * 1e6:.0f} us CPU")
        # idle: the sequencer loop with nothing appended, against the same wait without it
        for label in ("without the loop", "with the loop"):
            stopping = asyncio.Event()
            task = asyncio.create_task(ledger.run(stopping)) if label == "with the loop" else None
            await asyncio.sleep(0.1)
            del sent[:]
            c0 = time.process_time()
            await asyncio.sleep(args.idle)
            c1 = time.process_time()
            n = len(sent)
            stopping.set()
            if task is not None:
                await task
            print(
                f"idle {label}: {(c1 - c0) / args.idle * 1e3:.2f} CPU ms/s, "
                f"{n / args.idle:.1f} statements/s   load {os.getloadavg()[0]:.2f}"
            )
    finally:
        await svc.stop()
        if args.db == "postgresql":
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--pg-name", default="tp_seq_micro")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 64, 2048])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--idle", type=float, default=5.0)
    args = parser.parse_args()
    configure_logging("error", "console")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
