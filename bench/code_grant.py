#!/usr/bin/env python3
"""Token endpoint load for the delegated grants, against client_credentials in the same run.

Starts a real `trustplane serve` (SQLite by default, PostgreSQL with --database-url), creates a user,
a code-flow client and a mandate, mints --requests authorization codes straight into the database
(the front channel is a person clicking; it is not what this measures), then drives POST /token over
loopback with --concurrency concurrent requests, each with a fresh private_key_jwt assertion:

  1. client_credentials (the baseline: one signed token, one durable jti + audit write);
  2. authorization_code (+ PKCE verify, code read, mandate check, conditional consume + refresh token
     insert in one transaction, then the jti + audit write);
  3. refresh_token (rotation: conditional update + insert, mandate check).

Prints tokens/s, p50/p99 latency and the ratio to the baseline. Numbers depend on the machine and
its load; they are printed, never asserted.

  python bench/code_grant.py
  python bench/code_grant.py --database-url postgresql://postgres@127.0.0.1:5432/bench_db
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port

BIN = Path(sys.executable).parent
RESOURCE = "https://execution.example/api"
REDIRECT = "https://client.example/cb"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LEI = "5493001KJTIIGC8Y1R12"
USER_LEI = "529900T8BM49AURSDO55"


async def prepare(count: int) -> dict[str, Any]:
    """User, client, mandate and ``count`` codes (plus the client's key) through the services."""
    from trustplane.app import Services
    from trustplane.authorize.pkce import s256
    from trustplane.authorize.store import GrantContext, SqlCodeStore
    from trustplane.keys.crypto import generate_private_key, public_jwk
    from trustplane.settings import load_settings
    from trustplane.storage.migrate import upgrade

    svc = Services.build(load_settings())
    await upgrade(svc.db)
    await svc.start()
    try:
        user = await svc.authorization.users.add("bench", "Bench User", USER_LEI, "x" * 16)
        key = generate_private_key("ES256")
        jwks = {"keys": [{**public_jwk(key), "kid": "bench", "alg": "ES256", "use": "sig"}]}
        reg = await svc.clients.register(
            {
                "client_name": "bench",
                "lei": LEI,
                "grant_types": ["client_credentials", "authorization_code", "refresh_token"],
                "redirect_uris": [REDIRECT],
                "scope": "order:create",
                "allowed_resources": [RESOURCE],
                "jwks": jwks,
            },
            initial_access_token=None,
        )
        client = reg.client
        mandate = await svc.mandates.create_from_consent(
            grantor_lei=USER_LEI,
            grantor_person=user.user_id,
            client=client,
            scopes=("order:create",),
            authorization_details=(),
            accepted_by=user.user_id,
        )
        grant = GrantContext(
            client.client_id, user.user_id, USER_LEI, mandate.id, mandate.version, RESOURCE,
            ("order:create",), (), int(time.time()), "urn:trustplane:acr:password",
        )  # fmt: skip
        verifier = secrets.token_urlsafe(48)
        codes = [secrets.token_urlsafe(32) for _ in range(count)]
        expires = int(time.time()) + 3600  # the bench runs longer than a real code would live
        async with svc.db.transaction() as conn:
            for code in codes:
                await SqlCodeStore().create(
                    conn, code, grant, redirect_uri=REDIRECT, redirect_uri_given=True,
                    code_challenge=s256(verifier), expires_at=expires,
                )  # fmt: skip
        return {"client_id": client.client_id, "key": key, "codes": codes, "verifier": verifier}
    finally:
        await svc.stop()


def assertions(client_id: str, key: Any, issuer: str, count: int) -> list[str]:
    from trustplane.jose.jws import Signer
    from trustplane.protocol.tokens import new_jti

    signer = Signer(key, "ES256", "bench", typ="JWT")
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": issuer, "iat": now, "exp": now + 290}
    return [signer.sign({**claims, "jti": new_jti()}) for _ in range(count)]


async def drive(base: str, forms: list[dict[str, str]], concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    bodies: list[dict[str, Any]] = []
    failures = 0
    queue = list(reversed(forms))

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while queue:
            form = queue.pop()
            start = time.perf_counter()
            response = await http.post("/token", data=form)
            latencies.append(time.perf_counter() - start)
            if response.status_code == 200:
                bodies.append(response.json())
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": len(forms) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "failures": failures,
        "bodies": bodies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tp-bench-code-"))
    port = free_port()
    os.environ.update(
        TRUSTPLANE_DATA_DIR=str(work),
        TRUSTPLANE_PORT=str(port),
        TRUSTPLANE_OPS_PORT=str(free_port()),  # not the default 9464: it may be taken
        TRUSTPLANE_LOG_LEVEL="warning",
        TRUSTPLANE_CACHE_REFRESH_INTERVAL="0.2",
    )
    if args.database_url:
        from trustplane.keys.crypto import new_kek_text

        os.environ.update(
            TRUSTPLANE_DATABASE_URL=args.database_url, TRUSTPLANE_KEY_ENCRYPTION_KEY=new_kek_text()
        )
    issuer = f"http://127.0.0.1:{port}"
    state = asyncio.run(prepare(args.requests))
    log = (work / "server.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "trustplane"), "serve", "--port", str(port)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{issuer}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.1)
        n, client_id = args.requests, state["client_id"]
        signed = assertions(client_id, state["key"], issuer, 3 * n)
        auth = [{"client_assertion_type": ASSERTION_TYPE, "client_assertion": a} for a in signed]
        baseline = [
            {"grant_type": "client_credentials", "scope": "order:create", "resource": RESOURCE,
             **auth[i]} for i in range(n)
        ]  # fmt: skip
        codes = [
            {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
             "code_verifier": state["verifier"], **auth[n + i]}
            for i, code in enumerate(state["codes"])
        ]  # fmt: skip
        results = {"client_credentials": asyncio.run(drive(issuer, baseline, args.concurrency))}
        results["authorization_code"] = asyncio.run(drive(issuer, codes, args.concurrency))
        refresh = [
            {"grant_type": "refresh_token", "refresh_token": body["refresh_token"],
             **auth[2 * n + i]}
            for i, body in enumerate(results["authorization_code"]["bodies"])
        ]  # fmt: skip
        results["refresh_token"] = asyncio.run(drive(issuer, refresh, args.concurrency))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(15)
    base_rate = results["client_credentials"]["rate"]
    database = "PostgreSQL" if args.database_url else "SQLite"
    print(f"{database}, 1 worker, {args.concurrency} concurrent requests, {n} requests per grant")
    print(f"{'grant':<20}{'tokens/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs cc':>8}{'non-200':>9}")
    for name, r in results.items():
        print(
            f"{name:<20}{r['rate']:>10.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}"
            f"{r['rate'] / base_rate:>8.2f}{r['failures']:>9}"
        )


if __name__ == "__main__":
    main()
