#!/usr/bin/env python3
"""Token exchange (RFC 8693) load over HTTP on loopback, with the client_credentials figure from the
same run and the same server beside it as the baseline.

Starts a real `trustplane serve` (SQLite by default, PostgreSQL with --database-url), registers a
private_key_jwt client allowed client_credentials and token-exchange, and for each repetition
pre-mints subject tokens (our own access tokens, obtained by client_credentials from the server
before the timed part) and pre-generates one fresh client assertion per request (single-use jti).
An exchange verifies two signatures (client assertion and subject token), reads the revocation
table, asks the PDP (token:exchange), signs, and records issuance + decision in one group commit.
Reports exchanges/s, p50/p99, CPU per request. Target: >= 800 exchanges/s on one worker.

  python bench/token_exchange.py                     # SQLite, 1 worker, 32 connections
  python bench/token_exchange.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))
import token_endpoint as te

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKENS = 256
_SIGNERS: dict[str, object] = {}
_ARGS: dict[str, str] = {}
_SUBJECTS: list[str] = []


def _init(client_pem: bytes, args: dict[str, str], subjects: list[str]) -> None:
    from trustplane.jose.jws import Signer

    key = serialization.load_pem_private_key(client_pem, password=None)
    _SIGNERS["client"] = Signer(key, "ES256", "bench-key", typ="JWT")  # type: ignore[arg-type]
    _ARGS.update(args)
    _SUBJECTS[:] = subjects


def _sign(name: str, claims: dict[str, object]) -> str:
    return _SIGNERS[name].sign(claims)  # type: ignore[attr-defined, no-any-return]


def _body(i: int) -> str:
    now, a = int(time.time()), _ARGS
    client = _sign(
        "client",
        {
            "iss": a["client_id"],
            "sub": a["client_id"],
            "aud": a["issuer"],
            "iat": now,
            "exp": now + 290,
            "jti": f"{a['prefix']}-c{i}",
        },
    )
    form = {
        "grant_type": a["grant_type"],
        "scope": "order:create",
        "resource": te.RESOURCE,
        "client_assertion_type": te.ASSERTION_TYPE,
        "client_assertion": client,
    }
    if a["grant_type"] == EXCHANGE:
        form["subject_token"] = _SUBJECTS[i % len(_SUBJECTS)]
        form["subject_token_type"] = ACCESS_TOKEN
    return urlencode(form)


def subject_tokens(pem: bytes, client_id: str, issuer: str, n: int) -> list[str]:
    """Fresh subject tokens, minted by the server (client_credentials) before the timed part."""
    import httpx

    from trustplane.pep import PrivateKeyJwt

    key = serialization.load_pem_private_key(pem, password=None)
    auth = PrivateKeyJwt(client_id, key, "bench-key", issuer)  # type: ignore[arg-type]
    tokens = []
    with httpx.Client(timeout=10) as http:
        for _ in range(n):
            form = {"grant_type": "client_credentials", "scope": "order:create"}
            form["resource"] = te.RESOURCE
            headers: dict[str, str] = {}
            auth.apply(form, headers)
            response = http.post(f"{issuer}/token", data=form, headers=headers)
            response.raise_for_status()
            tokens.append(response.json()["access_token"])
    return tokens


def make_bodies(path: Path, n: int, pem: bytes, args: dict[str, str], subjects: list[str]) -> None:
    args = {**args, "prefix": uuid.uuid4().hex[:12]}
    with mp.Pool(os.cpu_count() or 1, initializer=_init, initargs=(pem, args, subjects)) as pool:
        lines = pool.map(_body, range(n), chunksize=2000)
    path.write_text("\n".join(lines) + "\n")


def bench(
    label: str, grant_type: str, pid: int, cli_args: argparse.Namespace, ctx: dict[str, object]
) -> list[dict[str, float]]:
    results = []
    work = Path(str(ctx["work"]))
    args = {
        "client_id": str(ctx["client_id"]),
        "issuer": str(ctx["issuer"]),
        "grant_type": grant_type,
    }
    for rep in range(cli_args.reps + 1):  # rep 0 warms up and is discarded
        bodies = work / f"{label}-{rep}.bodies"
        pem = ctx["pem"]
        subjects = (
            subject_tokens(pem, args["client_id"], args["issuer"], SUBJECT_TOKENS)  # type: ignore[arg-type]
            if grant_type == EXCHANGE
            else []
        )
        make_bodies(bodies, cli_args.bodies, pem, args, subjects)  # type: ignore[arg-type]
        time.sleep(cli_args.rest)
        duration = cli_args.warmup if rep == 0 else cli_args.duration
        result = te.run_wrk(f"{ctx['issuer']}/token", bodies, cli_args.connections, duration, pid)
        bodies.unlink()
        if rep:
            results.append(result)
            print(
                f"  {label:<18} rep {rep}: {result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.1f} ms"
                f"  p99 {result['p99_ms']:6.1f} ms  cpu {result['cpu_ms_per_req']:.3f} ms/req"
                f"  non-2xx {result['non_2xx']:.0f}",
                flush=True,
            )
    return results


def setup(env: dict[str, str], work: Path) -> tuple[str, bytes]:
    te.cli("migrate", env=env)
    te.cli("clients", "keygen", "--out", str(work / "client"), "--kid", "bench-key", env=env)
    client = json.loads(
        te.cli(
            "clients", "add", "--lei", "5493001KJTIIGC8Y1R12", "--scope", "order:create",
            "--resource", te.RESOURCE, "--jwks-file", str(work / "client" / "jwks.json"),
            "--grant-type", "client_credentials", "--grant-type", EXCHANGE,
            "--name", "bench", "--json", env=env,
        )
    )  # fmt: skip
    return client["client_id"], (work / "client" / "key.pem").read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--database-url", default="", help="PostgreSQL admin URL (a fresh db is made)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rest", type=float, default=1.0)
    ap.add_argument("--bodies", type=int, default=40000, help="pre-generated requests per rep")
    ap.add_argument("--json", type=Path, help="append a JSON summary line to this file")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="tp-bench-tx-"))
    port = te.free_port()
    issuer = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TRUSTPLANE_DATA_DIR": str(work / "data"),
        "TRUSTPLANE_PORT": str(port),
        "TRUSTPLANE_LOG_LEVEL": "warning",
        "TRUSTPLANE_KEY_ROTATION_INTERVAL": "0",
    }
    env["TRUSTPLANE_KEY_ENCRYPTION_KEY"] = te.cli("keys", "new-kek", env=env).strip()
    pg_name = ""
    if args.database_url:
        pg_name = f"tp_bench_{uuid.uuid4().hex[:8]}"
        asyncio.run(te._create_pg_database(args.database_url, pg_name))
        env["TRUSTPLANE_DATABASE_URL"] = args.database_url.rsplit("/", 1)[0] + f"/{pg_name}"
    server, keep = None, False
    try:
        client_id, pem = setup(env, work)
        server = te.start(
            [str(te.BIN / "trustplane"), "serve", "--workers", str(args.workers)],
            env,
            work / "server.log",
        )
        te.wait_ready(f"{issuer}/healthz")
        store = "postgresql" if pg_name else "sqlite"
        print(
            f"trustplane: {store}, {args.workers} worker(s), {args.connections} connections, "
            f"{args.duration}s x {args.reps}",
            flush=True,
        )
        ctx: dict[str, object] = {
            "work": work, "issuer": issuer, "client_id": client_id, "pem": pem,
        }  # fmt: skip
        cc = bench("client_credentials", "client_credentials", server.pid, args, ctx)
        tx = bench("token-exchange", EXCHANGE, server.pid, args, ctx)
        summary = {
            "store": store,
            "workers": args.workers,
            "connections": args.connections,
            "exchanges_per_s": te.median(tx, "rps"),
            "exchange_p50_ms": te.median(tx, "p50_ms"),
            "exchange_p99_ms": te.median(tx, "p99_ms"),
            "exchange_cpu_ms": te.median(tx, "cpu_ms_per_req"),
            "client_credentials_per_s": te.median(cc, "rps"),
            "client_credentials_p50_ms": te.median(cc, "p50_ms"),
            "client_credentials_p99_ms": te.median(cc, "p99_ms"),
            "non_2xx": sum(r["non_2xx"] for r in tx + cc),
        }
        summary["ratio_to_client_credentials"] = (
            summary["exchanges_per_s"] / summary["client_credentials_per_s"]
        )
        print(json.dumps(summary, indent=2))
        if summary["non_2xx"]:
            keep = True
            print(f"WARNING: {summary['non_2xx']:.0f} non-2xx responses; see {work / 'server.log'}")
        if args.json:
            with args.json.open("a") as handle:
                handle.write(json.dumps(summary) + "\n")
    finally:
        if server is not None:
            te.stop(server)
        if pg_name:
            asyncio.run(te._create_pg_database(args.database_url, pg_name, drop=True))
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
