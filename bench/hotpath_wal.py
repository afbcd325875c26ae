#!/usr/bin/env python3
"""The WAL a token writes, by relation and record type, on PostgreSQL (``pg_walinspect``).

Starts one ``trustplane serve --workers N`` of this tree on a fresh database (as
``bench/hotpath.py`` does), warms it up, then runs a short wrk load (client_credentials with a fresh
ES256 private_key_jwt assertion per request) and reads back the WAL written meanwhile that names a
relation of that database: per token, the records and bytes (full-page images apart) of each
relation and record type, largest first. Commit records name no relation and are not counted; other
databases' WAL is left out. Keep the load short: on a shared server other tenants' WAL makes
checkpoints come often, and a checkpoint recycles the segments before it (the script then says so).

  python bench/hotpath_wal.py --database-url postgresql://postgres@127.0.0.1:5432/test --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asyncpg  # type: ignore[import-untyped]
from hotpath import OURS, admin_query, setup, wal_lsn
from token_endpoint import _create_pg_database, make_bodies, run_wrk, stop

BY_RELATION = (
    "WITH r AS (SELECT record_length, fpi_length, resource_manager, record_type, "
    "substring(block_ref from 'rel [0-9]+/[0-9]+/([0-9]+)')::oid AS fn "
    "FROM pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn) WHERE block_ref LIKE $3) "
    "SELECT coalesce(c.relname, r.fn::text), resource_manager, record_type, count(*), "
    "sum(record_length), sum(fpi_length) "
    "FROM r LEFT JOIN pg_class c ON c.relfilenode = r.fn GROUP BY 1, 2, 3 ORDER BY 5 DESC"
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--port-base", type=int, default=26150)
    args = ap.parse_args()
    args.wal, args.pg_count = True, False
    root = Path(tempfile.mkdtemp(prefix="tp-hotpath-wal-"))
    target = setup("ours", OURS / "src", "postgresql", args, root)
    own = args.database_url.rsplit("/", 1)[0] + f"/{target.pg_name}"
    try:
        bodies = target.work / "run.bodies"
        make_bodies(bodies, 6000 * (args.seconds + 3), target.pem, target.client_id, target.issuer)
        run_wrk(f"{target.issuer}/token", bodies, args.connections, 3, target.proc.pid)  # warm-up
        make_bodies(bodies, 6000 * args.seconds, target.pem, target.client_id, target.issuer)
        start = wal_lsn(own)
        result = run_wrk(f"{target.issuer}/token", bodies, args.connections, args.seconds,
                         target.proc.pid)  # fmt: skip
        end = wal_lsn(own)
        tokens = max(result["requests"], 1)
        try:
            rows = admin_query(own, BY_RELATION, start, end, f"%rel %/{target.db_oid}/%")
        except asyncpg.exceptions.UndefinedFileError:
            raise SystemExit("a checkpoint recycled the run's WAL: run it again") from None
        print(f"{tokens:.0f} tokens in {args.seconds} s; per token:")
        print(f"{'relation':32} {'manager':8} {'record':20} {'records':>8} {'bytes':>8} {'fpi':>8}")
        for name, manager, record, count, size, fpi in rows:
            print(
                f"{name:32} {manager:8} {record:20} {count / tokens:8.2f} "
                f"{(size - fpi) / tokens:8.1f} {fpi / tokens:8.1f}"
            )
        size = sum(int(r[4]) for r in rows) / tokens
        fpi = sum(int(r[5]) for r in rows) / tokens
        print(f"total: {size:.0f} bytes per token, of which full-page images {fpi:.0f}")
    finally:
        stop(target.proc)
        asyncio.run(_create_pg_database(args.database_url, target.pg_name, drop=True))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
