#!/usr/bin/env python3
"""JWT-bearer grant load (RFC 7523 §2.1, partner assertions) over HTTP on loopback, with the
client_credentials figure from the same run and the same server beside it as the baseline.

Starts a real `trustplane serve` (SQLite by default, PostgreSQL with --database-url), adds a partner
trust profile with `trustplane partners add`, registers a private_key_jwt client allowed both grants,
and for each repetition pre-generates one fresh client assertion AND one fresh partner assertion per
request (each sent exactly once: both jtis are single-use), then drives POST /token with wrk. A
jwt-bearer request verifies two signatures (client and partner) and consumes two jtis in the same
group commit; client_credentials verifies one. Reports requests/s, p50/p99, CPU per request.

  python bench/jwt_bearer.py                     # SQLite, 1 worker, 32 connections
  python bench/jwt_bearer.py --database-url postgresql://postgres@127.0.0.1:5432/test
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

import yaml
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))
import token_endpoint as te
from _common import free_port, wait_ready

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
PARTNER_ISSUER = "https://idp.bench-partner.example"
_SIGNERS: dict[str, object] = {}
_ARGS: dict[str, str] = {}


def _init(client_pem: bytes, partner_pem: bytes, args: dict[str, str]) -> None:
    from trustplane.jose.jws import Signer

    for name, pem, kid in (("client", client_pem, "bench-key"), ("partner", partner_pem, "p1")):
        key = serialization.load_pem_private_key(pem, password=None)
        _SIGNERS[name] = Signer(key, "ES256", kid, typ="JWT")  # type: ignore[arg-type]
    _ARGS.update(args)


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
    if a["grant_type"] == JWT_BEARER:
        form["assertion"] = _sign(
            "partner",
            {
                "iss": PARTNER_ISSUER,
                "sub": f"trader-{i % 100}",
                "aud": a["issuer"],
                "iat": now,
                "exp": now + 290,
                "jti": f"{a['prefix']}-p{i}",
                "desk": "rates-emea",
            },
        )
    return urlencode(form)


def make_bodies(path: Path, n: int, pems: tuple[bytes, bytes], args: dict[str, str]) -> None:
    args = {**args, "prefix": uuid.uuid4().hex[:12]}
    with mp.Pool(os.cpu_count() or 1, initializer=_init, initargs=(*pems, args)) as pool:
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
        make_bodies(bodies, cli_args.bodies, ctx["pems"], args)  # type: ignore[arg-type]
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


def partner_profile(public_jwk: dict[str, object]) -> dict[str, object]:
    return {
        "partner_id": "bench-partner",
        "lei": "529900T8BM49AURSDO55",
        "issuers": [PARTNER_ISSUER],
        "keys": {"jwks": {"keys": [{**public_jwk, "kid": "p1", "alg": "ES256", "use": "sig"}]}},
        "algorithms": ["ES256"],
        "max_assertion_lifetime": 300,
        "required_claims": ["desk"],
        "claim_mappings": {"desk": "desk"},
        "allowed_scopes": ["order:create"],
        "allowed_audiences": [te.RESOURCE],
        "accepted_token_types": ["urn:ietf:params:oauth:token-type:jwt"],
    }


def setup(env: dict[str, str], work: Path) -> tuple[str, tuple[bytes, bytes]]:
    from trustplane.keys.crypto import generate_private_key, public_jwk

    te.cli("migrate", env=env)
    te.cli("clients", "keygen", "--out", str(work / "client"), "--kid", "bench-key", env=env)
    partner_key = generate_private_key("ES256")
    (work / "partner.yaml").write_text(yaml.safe_dump(partner_profile(public_jwk(partner_key))))
    te.cli("partners", "add", str(work / "partner.yaml"), env=env)
    client = json.loads(
        te.cli(
            "clients", "add", "--lei", "5493001KJTIIGC8Y1R12", "--scope", "order:create",
            "--resource", te.RESOURCE, "--jwks-file", str(work / "client" / "jwks.json"),
            "--grant-type", "client_credentials", "--grant-type", JWT_BEARER,
            "--name", "bench", "--json", env=env,
        )
    )  # fmt: skip
    partner_pem = partner_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return client["client_id"], ((work / "client" / "key.pem").read_bytes(), partner_pem)


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

    work = Path(tempfile.mkdtemp(prefix="tp-bench-jwtb-"))
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    env, pg_name = te.server_env(work, port, args.database_url)
    server, keep = None, False
    try:
        client_id, pems = setup(env, work)
        server = te.start(
            [str(te.BIN / "trustplane"), "serve", "--workers", str(args.workers)],
            env,
            work / "server.log",
        )
        wait_ready(f"{issuer}/healthz")
        store = "postgresql" if pg_name else "sqlite"
        print(
            f"trustplane: {store}, {args.workers} worker(s), {args.connections} connections, "
            f"{args.duration}s x {args.reps}",
            flush=True,
        )
        ctx: dict[str, object] = {
            "work": work, "issuer": issuer, "client_id": client_id, "pems": pems,
        }  # fmt: skip
        cc = bench("client_credentials", "client_credentials", server.pid, args, ctx)
        jb = bench("jwt-bearer", JWT_BEARER, server.pid, args, ctx)
        summary = {
            "store": store,
            "workers": args.workers,
            "connections": args.connections,
            "jwt_bearer_per_s": te.median(jb, "rps"),
            "jwt_bearer_p50_ms": te.median(jb, "p50_ms"),
            "jwt_bearer_p99_ms": te.median(jb, "p99_ms"),
            "jwt_bearer_cpu_ms": te.median(jb, "cpu_ms_per_req"),
            "client_credentials_per_s": te.median(cc, "rps"),
            "client_credentials_p50_ms": te.median(cc, "p50_ms"),
            "client_credentials_p99_ms": te.median(cc, "p99_ms"),
            "non_2xx": sum(r["non_2xx"] for r in jb + cc),
        }
        summary["ratio_to_client_credentials"] = (
            summary["jwt_bearer_per_s"] / summary["client_credentials_per_s"]
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
