#!/usr/bin/env python3
"""How fast the surveillance detector reads the ledger: --entries integrated ``oauth:token:issued``
entries spread over --clients clients (a tenth of them token exchanges with an actor chain), then
the detector catches up from leaf 0 in rounds of --batch; prints leaves/s and ms per round.

  python bench/surveillance.py                                     # SQLite in a temp dir
  python bench/surveillance.py --database postgresql://postgres@127.0.0.1:5432/mydb   # migrated
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import truncate_all
from tests.surveillance.rig import T0, Rig, issued
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database or f"sqlite+aiosqlite:///{tmp}/bench.db"
        if args.database:
            await truncate_all(url)
        else:
            db = Database(url)
            await upgrade(db)
            await db.dispose()
        rig = await Rig.open(url, Path(tmp), surveillance_batch=args.batch)
        try:
            for start in range(0, args.entries, 5000):
                await rig.append(
                    *(
                        issued(
                            f"c-{n % args.clients}",
                            T0 + n * 10,
                            actors=(f"svc-{n % 7}",) if n % 10 == 0 else (),
                            subject=f"s-{n % 13}",
                        )
                        for n in range(start, min(args.entries, start + 5000))
                    )
                )
            detector = rig.detector()
            rounds, started = 0, time.perf_counter()
            while (done := await detector.round()) is not None and done.read:
                rounds += 1
            seconds = time.perf_counter() - started
            kind = "PostgreSQL" if args.database else "SQLite"
            print(
                f"{kind}: {args.entries} entries, {args.clients} clients, batch {args.batch}: "
                f"{seconds:.2f} s, {args.entries / seconds:,.0f} leaves/s, "
                f"{1000 * seconds / max(rounds, 1):.1f} ms per round ({rounds} rounds)"
            )
        finally:
            await rig.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--database", default="")
    asyncio.run(main(parser.parse_args()))
