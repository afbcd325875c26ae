"""Index entries written per token, from PostgreSQL's own counters, for one database.

    python bench/pg_index_entries.py postgresql://postgres@127.0.0.1:5432/tp_bench_1234abcd

Per table, the rows written since the statistics were reset (``pg_stat_user_tables``: inserts plus
the updates that were not HOT, each of which adds an entry to every index); per index, that many
entries, times the fraction of the table's current rows its predicate admits for a partial index
(a BRIN index counts none: it holds one summary per block range, not an entry per row).
Divided by the tokens: the client assertions consumed (``used_jtis`` inserts, one per
client_credentials token). Run it on the database of a ``bench/hotpath.py`` server while it still
exists (the bench drops it at the end).

``--outbox`` measures what an outbox row costs over its life instead, on a scratch database whose
schema the tree's own code makes (trustplane's migrations, the reference store's ``create_schema``),
with ``--prefill`` rows already published (and in the ledger) and never ANALYZEd: ``--events`` rows
appended, marked published (the publisher's statement, 100 a batch) and, for ``ref_outbox``, marked
delivered to the ledger (the forwarder's); ``security_events`` marked one by one as its publisher
does; ``ref_transitions`` rows as a learning (reporting) store records them. Per event and phase: the WAL the statements wrote (``EXPLAIN (ANALYZE, WAL)``: this session's
records alone, whatever else the server runs; the bytes also without the statements that logged a
full-page image, which depend on when the server last checkpointed), and the index entries (rows written, the updates
that were not HOT, from ``pg_stat_user_tables``, times the indexes whose predicate the new row
version meets). Then the publisher's and the forwarder's reads with a few rows pending: what they
touched (``EXPLAIN (ANALYZE, BUFFERS)``).

    PYTHONPATH=$TREE/src python bench/pg_index_entries.py --outbox --prefill 500000 --events 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import asyncpg  # type: ignore[import-untyped]

PG = "postgresql://postgres@127.0.0.1:5432"
#: The tables' ordering key, where it is not ``seq``.
KEYS = {"ref_transitions": "id"}


async def main(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        tables = {
            r["relname"]: int(r["n_tup_ins"]) + int(r["n_tup_upd"]) - int(r["n_tup_hot_upd"])
            for r in await conn.fetch(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
            )
        }
        tokens = tables.get("used_jtis", 0)
        if not tokens:
            raise SystemExit("no used_jtis rows: no tokens issued here")
        indexes = await conn.fetch(
            "SELECT c.relname AS tbl, i.relname AS idx, pg_get_expr(x.indpred, x.indrelid) AS pred, "
            "a.amname AS am FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_am a ON a.oid = i.relam "
            "JOIN pg_class c ON c.oid = x.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' ORDER BY 1, 2"
        )
        total = 0.0
        print(f"tokens (used_jtis inserts): {tokens}")
        for r in indexes:
            written = tables.get(r["tbl"], 0)
            if not written:
                continue
            if r["am"] == "brin":  # one summary per block range, no entry per row
                print(f"{r['tbl']:20} {r['idx']:36}   0.00  (BRIN: per block range)")
                continue
            fraction = 1.0
            if r["pred"]:
                rows = await conn.fetchval(f'SELECT count(*) FROM "{r["tbl"]}"')  # noqa: S608
                kept = await conn.fetchval(f'SELECT count(*) FROM "{r["tbl"]}" WHERE {r["pred"]}')  # noqa: S608
                fraction = kept / rows if rows else 0.0
            per = written * fraction / tokens
            total += per
            where = f"  WHERE {r['pred']}" if r["pred"] else ""
            print(f"{r['tbl']:20} {r['idx']:36} {per:6.2f}{where}")
        print(f"index entries per token: {total:.2f}")
    finally:
        await conn.close()


async def _wal(conn: Any, sql: str, *params: Any) -> tuple[int, int, int]:
    """WAL records, bytes and full-page images of one statement, run under EXPLAIN (ANALYZE, WAL)."""
    out = await conn.fetchval(f"EXPLAIN (ANALYZE, WAL, FORMAT JSON) {sql}", *params)
    plan = (json.loads(out) if isinstance(out, str) else out)[0]["Plan"]
    return int(plan["WAL Records"]), int(plan["WAL Bytes"]), int(plan["WAL FPI"])


async def _written(conn: Any, table: str) -> tuple[int, int]:
    """Rows inserted and updates that were not HOT, so far (this backend's counters flushed)."""
    await asyncio.sleep(0.3)
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT n_tup_ins, n_tup_upd - n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1",
        table,
    )
    return int(row[0]), int(row[1])


async def _entries(conn: Any, table: str, first: int, writes: int) -> tuple[float, list[str]]:
    """Index entries per row for ``writes`` row versions of the rows from seq ``first``: each
    index whose predicate (none: every row) the rows now meet takes one."""
    indexes = await conn.fetch(
        "SELECT i.relname AS idx, pg_get_expr(x.indpred, x.indrelid) AS pred FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = $1::regclass ORDER BY 1",
        table,
    )
    key = KEYS.get(table, "seq")
    rows = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {key} >= $1", first)  # noqa: S608
    total, taken = 0.0, []
    for r in indexes:
        kept = rows
        if r["pred"]:
            kept = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE {key} >= $1 AND {r['pred']}",  # noqa: S608
                first,
            )
        if kept:
            total += writes * kept / rows
            taken.append(r["idx"])
    return total / rows, taken


async def _phase(
    writer: Any, reader: Any, table: str, first: int, name: str, run: Any
) -> tuple[int, float]:
    ins0, upd0 = await _written(reader, table)
    records = size = fpi = clean_bytes = clean_events = 0
    for sql, params in run:
        r, b, f = await _wal(writer, sql, *params)
        records, size, fpi = records + r, size + b, fpi + f
        if not f:  # the statements that logged no full-page image (a checkpoint's, anyone's)
            clean_bytes += b
            clean_events += len(params[0]) if isinstance(params[0], list) else 1
    await writer.execute("SELECT pg_stat_force_next_flush()")
    ins1, upd1 = await _written(reader, table)
    key = KEYS.get(table, "seq")
    events = await reader.fetchval(f"SELECT count(*) FROM {table} WHERE {key} >= $1", first)  # noqa: S608
    entries, indexes = await _entries(reader, table, first, (ins1 - ins0) + (upd1 - upd0))
    clean = clean_bytes / clean_events if clean_events else float("nan")
    print(f"  {table} {name:9}: {records / events:5.2f} WAL records, {size / events:7.1f} WAL "
          f"bytes ({fpi} full-page images; {clean:6.1f} without them), {entries:4.2f} index "
          f"entries per event ({', '.join(indexes)}; {upd1 - upd0} updates not HOT)",
          flush=True)  # fmt: skip
    return records, clean


async def _reads(conn: Any, reads: dict[str, str]) -> None:
    for name, sql in reads.items():
        out = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
        plan = (json.loads(out) if isinstance(out, str) else out)[0]["Plan"]
        node, scans = plan, []
        while node:
            scans.append(f"{node['Node Type']}" + (f" {node['Index Name']}" if "Index Name" in node
                                                   else ""))  # fmt: skip
            node = (node.get("Plans") or [None])[0]
        print(f"    {name}: {plan['Shared Hit Blocks'] + plan['Shared Read Blocks']} buffers, "
              f"{plan['Actual Rows']} rows, {plan['Actual Total Time']:.3f} ms: "
              f"{' > '.join(scans)}")  # fmt: skip


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def outbox(prefill: int, events: int) -> None:
    from trustplane.reference import store_pg
    from trustplane.reference.events import EventSigner
    from trustplane.reference.store import TradeStore
    from trustplane.storage.db import Database
    from trustplane.storage.migrate import upgrade

    name = f"tp_bench_outbox_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"')
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
    writer = reader = None
    try:
        await upgrade(db)
        # a learning store's (the acting token's indexes are the settlement's alone)
        signer = EventSigner.generate("https://bench.example")
        await TradeStore(db, signer, service="reporting").create_schema()
        await db.dispose()
        writer, reader = (
            await asyncpg.connect(f"{PG}/{name}"),
            await asyncpg.connect(f"{PG}/{name}"),
        )
        jws = "x" * 600
        await writer.execute(
            "INSERT INTO ref_outbox (event_id, type, trade_id, jws, created_at, published_at, "
            "ledger_at) SELECT md5(i::text), 'order.created', 't' || i, $1, 1, 2, 3 "
            "FROM generate_series(1, $2) i", jws, prefill,
        )  # fmt: skip
        await writer.execute(
            "INSERT INTO security_events (jti, event_type, mandate_id, mandate_version, token, "
            "created_at, published_at) SELECT md5(i::text), 't', 'm' || i, 1, $1, 1, 2 "
            "FROM generate_series(1, $2) i", jws, prefill // 5,
        )  # fmt: skip
        print(f"{prefill} ref_outbox rows (and transitions), {prefill // 5} security_events, "
              f"{events} events appended and marked, no statistics")  # fmt: skip
        first = prefill + 1
        append = [("INSERT INTO ref_outbox (event_id, type, trade_id, txn, jws, created_at) "
                   "VALUES ($1, 'order.created', $2, $3, $4, 5)",
                   (uuid.uuid4().hex, f"T-{i}", f"txn-{i}", jws)) for i in range(events)]  # fmt: skip
        batches = [
            list(range(s, min(s + 100, first + events))) for s in range(first, first + events, 100)
        ]
        publish = [(store_pg.MARK_PUBLISHED, (b, 7)) for b in batches]
        ledger = [("UPDATE ref_outbox SET ledger_at = $2 WHERE seq = ANY($1::integer[]) "
                   "AND ledger_at IS NULL", (b, 8)) for b in batches]  # fmt: skip
        total = [0.0, 0.0]
        for phase, run in (("append", append), ("published", publish), ("ledger", ledger)):
            r, b = await _phase(writer, reader, "ref_outbox", first, phase, run)
            total = [total[0] + r, total[1] + b]
        print(f"  ref_outbox over its life: {total[0] / events:.2f} WAL records, "
              f"{total[1]:.1f} WAL bytes per event without full-page images")  # fmt: skip
        sfirst = prefill // 5 + 1
        sets = [("INSERT INTO security_events (jti, event_type, mandate_id, mandate_version, "
                 "token, created_at) VALUES ($1, 't', $2, 1, $3, 5)",
                 (uuid.uuid4().hex, f"m-{i}", jws)) for i in range(events)]  # fmt: skip
        marks = [("UPDATE security_events SET published_at = $1 WHERE seq = $2", (9, s))
                 for s in range(sfirst, sfirst + events)]  # fmt: skip
        total = [0.0, 0.0]
        phases: list[tuple[str, list[Any]]] = [("append", sets), ("published", marks)]
        for phase, run in phases:
            r, b = await _phase(writer, reader, "security_events", sfirst, phase, run)
            total = [total[0] + r, total[1] + b]
        print(f"  security_events over its life: {total[0] / events:.2f} WAL records, "
              f"{total[1]:.1f} WAL bytes per event without full-page images")  # fmt: skip
        await writer.execute(
            "INSERT INTO ref_transitions (trade_id, transition, source, target, actor, event_id, "
            "at, token_iss, token_jti, mandate_id) SELECT 'P-' || i, 'execute', 'created', "
            "'executed', 'svc', md5(i::text), 1, 'https://as.example', md5('j' || i), 'm-' || i % 50 "
            "FROM generate_series(1, $1) i", prefill,
        )  # fmt: skip
        tfirst = prefill + 1
        learned = [("INSERT INTO ref_transitions (trade_id, transition, source, target, actor, "
                    "event_id, at, token_iss, token_jti, mandate_id) VALUES ($1, 'execute', "
                    "'created', 'executed', 'svc', $2, 5, 'https://as.example', $3, $4)",
                    (f"T-{i}", uuid.uuid4().hex[:36], uuid.uuid4().hex, f"m-{i % 50}"))
                   for i in range(events)]  # fmt: skip
        await _phase(writer, reader, "ref_transitions", tfirst, "learned", learned)
        for i in range(5):  # a few pending
            await writer.execute(append[0][0], uuid.uuid4().hex, f"P-{i}", None, jws)
            await writer.execute(sets[0][0], uuid.uuid4().hex, f"p-{i}", jws)
        for attempt in ("first", "again"):  # the first walks the marked rows' dead entries
            print(f"  reads with 5 pending ({attempt}):")
            await _reads(reader, {
                "publisher": store_pg.UNPUBLISHED.replace("$1", "100").replace("$2", "0"),
                "forwarder": "SELECT * FROM ref_outbox WHERE ledger_at IS NULL ORDER BY seq "
                "LIMIT 100",
                "SET publisher": "SELECT seq, jti, event_type, token FROM security_events "
                "WHERE published_at IS NULL ORDER BY seq LIMIT 100",
            })  # fmt: skip
    finally:
        for conn in (writer, reader):
            if conn is not None:
                await conn.close()
        await db.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    if sys.argv[1:2] != ["--outbox"]:
        asyncio.run(main(sys.argv[1]))
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--outbox", action="store_true")
        ap.add_argument("--prefill", type=int, default=500_000)
        ap.add_argument("--events", type=int, default=2000)
        args = ap.parse_args()
        asyncio.run(outbox(args.prefill, args.events))
