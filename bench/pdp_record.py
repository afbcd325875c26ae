#!/usr/bin/env python3
"""What recording a decision costs the PDP server: CPU per AuthZEN single evaluation over HTTP
(``/access/v1/evaluation``, every decision recorded durably before the answer), on SQLite or
PostgreSQL, with the server run from a source tree of your choice so that two versions can be
compared alternately in one sitting.

Per run: a fresh ``trustplane serve`` (one worker) on a fresh database, a PEP client registered, the
server's idle CPU measured for 5 s, a 2 s wrk warm-up, then ``--duration`` seconds of wrk at ``-c``
connections. Reported per decision: the server process tree's CPU (with and without its idle
share), and on PostgreSQL also the CPU of the database backends serving that server (from
``/proc``, the backends of the run's own database only). ``--profile DIR`` samples the server with
py-spy during the timed run instead (collapsed stacks, one file per run; the CPU figures of a
profiled run are not comparable).

  python bench/pdp_record.py --db sqlite --src src --src /tmp/old/src --reps 3
  python bench/pdp_record.py --db postgresql --src src --profile /tmp/prof

``--src`` may be given several times: runs alternate between the trees (A B A B ...).

``--inproc``: the recording alone, in one process per run (the tree's ``src`` on its path): records
built beforehand by the engine (the Cedar evaluation is not timed), then ``--records`` of them
made durable through a group-commit writer and ``DecisionRecorder`` with ``-c`` in flight; the
process CPU per recorded decision (and, on PostgreSQL, its database backends'). No HTTP, no
ledger sequencer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, wait_ready
from pdp_http import IDLE_SECONDS, _access_token, _evaluation_json, _wrk
from token_endpoint import TICK, process_tree_ticks

BIN = Path(sys.executable).parent
PG = "postgresql://postgres@127.0.0.1:5432"
PY_SPY = os.environ.get("PY_SPY", "py-spy")  # COMMON.md puts it in /tmp/tools/bin
#: The scratch PostgreSQL databases' name prefix (``--db-prefix``).
DB_PREFIX = ["tp_record"]


def _psql(sql: str, db: str = "test") -> str:
    return subprocess.run(
        ["psql", f"{PG}/{db}", "-Atqc", sql], capture_output=True, text=True, check=True
    ).stdout


def _backend_ticks(database: str) -> int:
    sql = f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}'"  # noqa: S608 - ours
    pids = _psql(sql).split()
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "trustplane"), *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"trustplane {args[0]}: {done.stderr.strip()}")
    return done.stdout


@contextmanager
def served(db: str, src: Path) -> Iterator[tuple[str, int, str, Path, str | None]]:
    """(issuer, server pid, access token, work dir, PostgreSQL database name or None)."""
    with tempfile.TemporaryDirectory(prefix="tp-bench-record-") as tmp:
        work = Path(tmp)
        port = free_port()
        issuer = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
        env.update(
            PYTHONPATH=str(src.resolve()),
            TRUSTPLANE_DATA_DIR=str(work),
            TRUSTPLANE_PORT=str(port),
            TRUSTPLANE_OPS_PORT=str(free_port()),
            TRUSTPLANE_LOG_LEVEL="warning",
        )
        database = None
        if db == "postgresql":
            database = f"{DB_PREFIX[0]}_{secrets.token_hex(4)}"
            _psql(f'CREATE DATABASE "{database}"')
            env["TRUSTPLANE_DATABASE_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1/{database}"
            env["TRUSTPLANE_KEY_ENCRYPTION_KEY"] = _cli(env, "keys", "new-kek").strip()
        server = None
        try:
            _cli(env, "migrate")
            _cli(env, "clients", "keygen", "--out", str(work / "client"), "--kid", "bench-pep")
            client = json.loads(
                _cli(
                    env,
                    *("clients", "add", "--lei", "5493001KJTIIGC8Y1R12"),
                    *("--scope", "decision:evaluate", "--resource", f"{issuer}/access/v1"),
                    *("--jwks-file", str(work / "client" / "jwks.json"), "--json"),
                    *("--name", "bench pep"),
                )
            )
            log = (work / "server.log").open("wb")
            server = subprocess.Popen(
                [str(BIN / "trustplane"), "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            wait_ready(f"{issuer}/healthz", timeout=60.0)
            key = (work / "client" / "key.pem").read_bytes()
            token = _access_token(issuer, client["client_id"], key, "bench-pep")
            yield issuer, server.pid, token, work, database
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=15)
            if database is not None:
                _psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def one_run(args: argparse.Namespace, src: Path, rep: int) -> dict[str, Any]:
    with served(args.db, src) as (issuer, pid, token, work, database):
        body = _evaluation_json()
        body_file = work / "evaluation.json"
        body_file.write_text(json.dumps(body))
        url = f"{issuer}/access/v1/evaluation"
        check = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
        assert check.status_code == 200, check.text
        before, started = process_tree_ticks(pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle_per_s = (process_tree_ticks(pid) - before) / TICK / (time.monotonic() - started)
        _wrk(url, body_file, token, args.connections, 2)  # warm-up
        spy = None
        if args.profile:
            out = Path(args.profile) / f"{args.db}-{src.parent.name}-{rep}.txt"
            spy = subprocess.Popen(
                [
                    *(PY_SPY, "record", "-p", str(pid), "-s", "-r", "250", "-f", "raw"),
                    *("-o", str(out), "-d", str(args.duration), "--nonblocking"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        db_before = _backend_ticks(database) if database else 0
        before = process_tree_ticks(pid)
        load = Path("/proc/loadavg").read_text().split()[0]
        result = _wrk(url, body_file, token, args.connections, args.duration)
        cpu_s = (process_tree_ticks(pid) - before) / TICK
        db_s = (_backend_ticks(database) - db_before) / TICK if database else 0.0
        if spy is not None:
            spy.wait(timeout=60)
        decisions = max(result["rps"] * args.duration, 1)
        return {
            "src": str(src),
            "rps": result["rps"],
            "cpu_ms": 1000 * cpu_s / decisions,
            "busy_ms": 1000 * (cpu_s - idle_per_s * args.duration) / decisions,
            "db_ms": 1000 * db_s / decisions,
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
            "non_2xx": result["non_2xx"],
            "load": load,
        }


async def _inproc(db: str, records: int, concurrency: int) -> dict[str, Any]:
    import dataclasses

    from pdp_http import LEI, order_request

    from trustplane.authzen.model import DecisionRequest, Entity
    from trustplane.policy.bundle import compile_bundle, default_bundle
    from trustplane.policy.engine import PolicyEngine
    from trustplane.policy.recorder import DecisionRecorder
    from trustplane.storage.db import Database
    from trustplane.storage.migrate import upgrade
    from trustplane.storage.writer import GroupCommitWriter

    order, context = order_request()
    owner = Entity("LegalEntity", LEI)
    subject = Entity("Client", "c-1", {"legal_entity": owner, "scopes": ["order:create"]}, (owner,))
    engine = PolicyEngine(issuer="https://as.bench", served_regions=["eu"])
    engine.activate(compile_bundle(default_bundle()))
    request = DecisionRequest(subject, "order:create", order, context, "bench", None)
    ((_, template),) = engine.evaluate([request])

    def fresh() -> Any:
        event = dataclasses.replace(template.event, event_id=secrets.token_hex(16))
        return dataclasses.replace(template, event=event)

    with tempfile.TemporaryDirectory(prefix="tp-bench-record-") as tmp:
        database = None
        if db == "postgresql":
            database = f"{DB_PREFIX[0]}_{secrets.token_hex(4)}"
            _psql(f'CREATE DATABASE "{database}"')
            url = f"postgresql+asyncpg://postgres@127.0.0.1/{database}"
        else:
            url = f"sqlite+aiosqlite:///{tmp}/record.db"
        try:
            database_ = Database(url)
            await upgrade(database_)
            writer = GroupCommitWriter(database_)
            recorder = DecisionRecorder(writer)
            writer.start()

            async def run(todo: list[Any]) -> None:
                async def worker() -> None:
                    while todo:
                        await recorder.record([todo.pop()])

                await asyncio.gather(*(worker() for _ in range(concurrency)))

            await run([fresh() for _ in range(min(records, 1000))])  # warm-up
            todo = [fresh() for _ in range(records)]
            gc.collect()  # as the server does after its warm-up (trustplane.startup): the records
            gc.freeze()  # made beforehand are not traversed by every collection of the run
            batches = writer.batches
            db_ticks = _backend_ticks(database) if database else 0
            cpu, wall = time.process_time(), time.perf_counter()
            await run(todo)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            db_s = (_backend_ticks(database) - db_ticks) / TICK if database else 0.0
            batches = writer.batches - batches
            await writer.stop()
            await database_.dispose()
        finally:
            if database is not None:
                _psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return {
        "cpu_us": 1e6 * cpu / records,
        "db_us": 1e6 * db_s / records,
        "per_s": records / wall,
        "batch": records / max(batches, 1),
        "load": os.getloadavg()[0],
    }


def inproc_rows(args: argparse.Namespace, trees: list[Path]) -> None:
    print(f"recording alone, in process, {args.db}, {args.connections} in flight, {args.records}")
    rows: dict[Path, list[float]] = {src: [] for src in trees}
    db_rows: dict[Path, list[float]] = {src: [] for src in trees}
    for _ in range(args.reps):
        for src in trees:
            env = {**os.environ, "PYTHONPATH": f"{src.resolve()}"}
            out = subprocess.run(
                [
                    *(
                        sys.executable,
                        __file__,
                        "--inproc-child",
                        "--db",
                        args.db,
                        "--db-prefix",
                        args.db_prefix,
                    ),
                    *("-c", str(args.connections), "--records", str(args.records)),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows[src].append(r["cpu_us"])
            db_rows[src].append(r["db_us"])
            print(
                f"  {str(src)[-28:]:<28} CPU {r['cpu_us']:6.1f} us/decision "
                f"(database backends {r['db_us']:6.1f}), "
                f"{r['per_s']:6.0f}/s, {r['batch']:4.1f} per commit, load {r['load']:.1f}",
                flush=True,
            )
    for src, values in rows.items():
        print(
            f"  median {str(src)[-28:]:<28} {statistics.median(values):6.1f} us/decision "
            f"(database backends {statistics.median(db_rows[src]):6.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--src", type=Path, action="append", help="source tree(s) to alternate")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("--profile", help="directory for py-spy collapsed stacks")
    parser.add_argument("--inproc", action="store_true", help="the recording alone, in process")
    parser.add_argument("--records", type=int, default=8000, help="--inproc: decisions recorded")
    parser.add_argument("--inproc-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db-prefix", default="tp_record", help="scratch database name prefix")
    args = parser.parse_args()
    DB_PREFIX[0] = args.db_prefix
    trees = args.src or [Path(__file__).resolve().parents[1] / "src"]
    if args.inproc_child:
        print(json.dumps(asyncio.run(_inproc(args.db, args.records, args.connections))))
        return
    if args.inproc:
        inproc_rows(args, trees)
        return
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{args.db}, c={args.connections}, {args.duration} s per run")
    print(
        f"{'tree':<28} {'dec/s':>7} {'CPU ms':>7} {'-idle':>7} {'db ms':>6} {'p50':>6} {'p99':>6}"
    )
    for rep in range(args.reps):
        for src in trees:
            r = one_run(args, src, rep)
            rows.append(r)
            print(
                f"{r['src'][-28:]:<28} {r['rps']:>7.0f} {r['cpu_ms']:>7.3f} {r['busy_ms']:>7.3f} "
                f"{r['db_ms']:>6.3f} {r['p50_ms']:>6.1f} {r['p99_ms']:>6.1f}  "
                f"non-2xx {r['non_2xx']} load {r['load']}",
                flush=True,
            )
    if len(trees) > 1 and args.reps > 1:
        print("medians:")
        for src in trees:
            mine = [r for r in rows if r["src"] == str(src)]
            cpu = statistics.median(r["cpu_ms"] for r in mine)
            busy = statistics.median(r["busy_ms"] for r in mine)
            rps = statistics.median(r["rps"] for r in mine)
            dbm = statistics.median(r["db_ms"] for r in mine)
            print(f"  {str(src)[-28:]:<28} {rps:>7.0f} {cpu:>7.3f} {busy:>7.3f} {dbm:>6.3f}")


if __name__ == "__main__":
    main()
