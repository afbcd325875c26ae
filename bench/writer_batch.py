#!/usr/bin/env python3
"""The token endpoint's group commit alone, on PostgreSQL: client and backend CPU per batch.

The load-independent half of ``bench/hotpath.py``: no HTTP, no signing, no wrk. One process submits
``--batch`` token outcomes at once (each: a fresh assertion ``jti`` to consume, the issuance event,
one policy decision with its replayable inputs, as client_credentials records them) to a real
``GroupCommitWriter`` and waits for the commit, ``--batches`` times. Reported per batch: this
process's CPU (the writer's client side: SQLAlchemy, asyncpg, the kernel's loopback sends) and the
PostgreSQL backend's CPU (from /proc), and wall time. A CPU time is what the batch costs whatever
else runs on the machine; the wall time is not.

``--tree`` runs each given checkout's sources (its ``src/`` first on ``PYTHONPATH``) in its own
process, alternated, on its own fresh database:

  python bench/writer_batch.py --tree . ../hotpath-base --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
#: What a client_credentials decision's inputs look like (~680 bytes).
INPUTS = json.dumps(
    {
        "request": {
            "principal": {"type": "Client", "id": "tp-o4_Uqs6M13lspoEmnOGHBw"},
            "action": {"type": "Action", "id": "token:obtain"},
            "resource": {"type": "Scope", "id": "order:create"},
            "context": {
                "audience": "https://execution.example/api",
                "requested_scopes": ["order:create"],
                "grant_type": "client_credentials",
            },
        },
        "entities": [
            {
                "uid": {"type": "Client", "id": "tp-o4_Uqs6M13lspoEmnOGHBw"},
                "attrs": {
                    "legal_entity": {"__entity": {"type": "LegalEntity", "id": "5493001KJTI"}},
                    "scopes": ["order:create"],
                },
                "parents": [{"type": "LegalEntity", "id": "5493001KJTI"}],
            },
            {
                "uid": {"type": "Scope", "id": "order:create"},
                "attrs": {"name": "order:create", "audience": "https://execution.example/api"},
                "parents": [],
            },
        ],
    },
    separators=(",", ":"),
)


def _outcome() -> object:
    from trustplane.audit_events import AuditEvent, AuditEventType
    from trustplane.errors import InvalidClientError
    from trustplane.grant.outcomes import ConsumeJti, Outcome
    from trustplane.policy.recorder import DecisionRecord
    from trustplane.protocol.replay import ReplayUse

    issuer, client = "http://127.0.0.1:8000", "tp-o4_Uqs6M13lspoEmnOGHBw"
    issued = AuditEvent(
        type=AuditEventType.TOKEN_ISSUED, issuer=issuer, subject=client, client_id=client,
        audience="https://execution.example/api", scopes=("order:create",),
        jti=uuid.uuid4().hex, decision="allow",
        payload={"grant_type": "client_credentials", "exp": int(time.time()) + 300},
    )  # fmt: skip
    decided = AuditEvent(
        type=AuditEventType.POLICY_DECISION_ALLOWED, issuer=issuer, subject=client,
        client_id=client, decision="allow", policy_bundle_version="b" * 64,
        payload={"cached": True},
    )  # fmt: skip
    use = ReplayUse(client, uuid.uuid4().hex, int(time.time()) + 300)
    return Outcome(
        event=issued,
        refused=lambda _error: issued,
        conditions=(ConsumeJti(use, InvalidClientError("replayed")),),
        decisions=(DecisionRecord(decided, "token:obtain", "order:create", 0, INPUTS),),
    )


def _backend_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def _run(url: str, batch: int, batches: int) -> dict[str, float]:
    """In the child: the tree's own writer and outcome recorder on ``url``."""
    from trustplane.grant.outcomes import OutcomeRecorder
    from trustplane.storage.db import Database
    from trustplane.storage.writer import GroupCommitWriter

    db = Database(url)
    writer = GroupCommitWriter(db)
    recorder = OutcomeRecorder(writer)
    writer.start()
    work = [[_outcome() for _ in range(batch)] for _ in range(batches + 20)]
    for outcomes in work[:20]:  # warm-up: connection, prepared statements
        await asyncio.gather(*(recorder.record(o) for o in outcomes))  # type: ignore[arg-type]
    async with db.read() as conn:  # the writer's backend: the busiest one of this database
        rows = await conn.exec_driver_sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
        pids = [int(r[0]) for r in rows]
    ticks0 = {p: _backend_ticks(p) for p in pids}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for outcomes in work[20:]:
        failed = await asyncio.gather(*(recorder.record(o) for o in outcomes))  # type: ignore[arg-type]
        assert not any(failed)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    backend = sum(_backend_ticks(p) - t for p, t in ticks0.items()) / os.sysconf("SC_CLK_TCK")
    batches_done = writer.batches
    await writer.stop()
    await db.dispose()
    return {
        "client_us": 1e6 * cpu / batches,
        "backend_us": 1e6 * backend / batches,
        "wall_us": 1e6 * wall / batches,
        "commits": float(batches_done),
    }


def _child(args: argparse.Namespace) -> None:
    result = asyncio.run(_run(args.child, args.batch, args.batches))
    print(json.dumps(result))


def _database(admin: str, name: str, *, drop: bool) -> None:
    sys.path.insert(0, str(HERE))
    from token_endpoint import _create_pg_database

    asyncio.run(_create_pg_database(admin, name, drop=drop))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tree", type=Path, nargs="+", default=[HERE.parent])
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--batch", type=int, default=8, help="outcomes per commit (c=32, 2 workers)")
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    runs: dict[Path, list[dict[str, float]]] = {tree.resolve(): [] for tree in args.tree}
    scratch = tempfile.mkdtemp(prefix="tp-writer-")
    base = args.database_url.rsplit("/", 1)[0]
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for tree in order:
            name = f"tp_writer_{uuid.uuid4().hex[:8]}"
            _database(args.database_url, name, drop=False)
            env = {**os.environ, "PYTHONPATH": str(tree / "src"), "TRUSTPLANE_DATA_DIR": scratch}
            url = f"{base}/{name}"
            try:
                subprocess.run(
                    [str(BIN / "trustplane"), "migrate"],
                    env={**env, "TRUSTPLANE_DATABASE_URL": url,
                         "TRUSTPLANE_KEY_ENCRYPTION_KEY": _kek(env)},
                    check=True, capture_output=True,
                )  # fmt: skip
                out = subprocess.run(
                    [sys.executable, __file__, "--child", url, "--batch", str(args.batch),
                     "--batches", str(args.batches)],
                    env=env, check=True, capture_output=True, text=True,
                ).stdout  # fmt: skip
            finally:
                _database(args.database_url, name, drop=True)
            result = json.loads(out.strip().splitlines()[-1])
            runs[tree].append(result)
            print(
                f"{tree}: batch {args.batch}: client {result['client_us']:6.0f} us  "
                f"backend {result['backend_us']:6.0f} us  wall {result['wall_us']:6.0f} us "
                f"per batch  (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    print("\nmedians per batch: tree | client CPU | PostgreSQL backend CPU | wall")
    for tree, results in runs.items():
        m = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(
            f"{tree} | {m['client_us']:.0f} us | {m['backend_us']:.0f} us | {m['wall_us']:.0f} us"
            f"  (per outcome: {m['client_us'] / args.batch:.0f} + {m['backend_us'] / args.batch:.0f} us)"
        )


def _kek(env: dict[str, str]) -> str:
    return subprocess.run(
        [str(BIN / "trustplane"), "keys", "new-kek"],
        env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


if __name__ == "__main__":
    main()
