"""Index entries written per token, from PostgreSQL's own counters, for one database.

    python bench/pg_index_entries.py postgresql://postgres@127.0.0.1:5432/tp_bench_1234abcd

Per table, the rows written since the statistics were reset (``pg_stat_user_tables``: inserts plus
the updates that were not HOT, each of which adds an entry to every index); per index, that many
entries, times the fraction of the table's current rows its predicate admits for a partial index
(a BRIN index counts none: it holds one summary per block range, not an entry per row).
Divided by the tokens: the client assertions consumed (``used_jtis`` inserts, one per
client_credentials token). Run it on the database of a ``bench/hotpath.py`` server while it still
exists (the bench drops it at the end).
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg  # type: ignore[import-untyped]


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


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
