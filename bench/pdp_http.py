#!/usr/bin/env python3
"""PEP and AuthZEN benchmarks (the PEP/AuthZEN sections of the PDP benchmark).

``bench_pep_validate_decide``: in process, per request, what a resource server pays before its
handler runs: bearer token validation (ES256, RFC 9068 checks) plus the in-process Cedar decision,
once with a new token per request (every signature verified) and once with a reused token (the
verified-token cache hit a client reusing its token for its lifetime gets). Baselines in the same run:
the raw ``cryptography`` ES256 verify and the engine's ``decide`` alone, so the PEP's own overhead
is visible as a difference.

``bench_authzen_handler``: the AuthZEN handler called as ASGI in process (no network, an engine that
does not record): the HTTP layer's own cost per decision, to compare with ``decide`` alone.

``bench_authzen_http``: a real ``trustplane serve`` (SQLite, one worker) on loopback, driven by wrk
with a valid bearer token: single evaluations, and batches of 10; every decision is recorded durably
by the decision point before the answer. Reports decisions/s, request latency p50/p99 and the
server's CPU milliseconds per decision (its process tree, from /proc, over the timed run), also
without its idle CPU (the background loops, measured for 5 s before the runs): on a shared machine
the rate, and with it the idle share per decision, moves from run to run.

``bench_authzen_client``: the PEP side, :class:`trustplane.pep.authzen.AuthzenClient` asking the
same server, sequentially from one process: decisions/s, latency, and this process's CPU per
decision (what a service pays to ask; the server's share is in the row above).

``bench_authzen_callers``: ``AuthzenClient.decide`` from 1, 4, 16 ... concurrent callers in one process
(one client, as a resource server has), against a fresh server: decisions/s, decision latency, the
client's and the server's CPU per decision (the server's also without its idle CPU), and HTTP
requests per decision (concurrent decisions coalesce into ``/evaluations`` batches).

  python bench/pdp_http.py                # both
  python bench/pdp_http.py --only pep     # in-process only (no wrk needed)
  python bench/pdp_http.py --only http -c 4 --duration 10   # the server under wrk, and the client
  python bench/pdp_http.py --only callers --callers 1,4,16 -n 2000   # concurrent PEP callers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.authzen.model import Entity
from trustplane.jose.jws import Signer
from trustplane.keys.crypto import public_jwk
from trustplane.pep import OutboundFetcher, PolicyEnforcer, TokenValidator, TrustedIssuer
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, wait_ready
from token_endpoint import TICK, process_tree_ticks

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ISSUER = "https://as.bench"
AUDIENCE = "https://execution.example/api"
LEI = "5493001KJTIIGC8Y1R12"
Row = dict[str, Any]
IDLE_SECONDS = 5.0
WRK = ("wrk", "-t1", "--latency", "-s", str(HERE / "authzen.lua"))


# --------------------------------------------------------------------------- the request


def order_request() -> tuple[Entity, dict[str, Any]]:
    owner = Entity("LegalEntity", LEI)
    account = Entity("Account", "ACC-1", {"owner": owner}, (owner,))
    instrument = Entity("Instrument", "XS1", {"instrument_class": "bond", "restricted": False})
    order = Entity("Order", "O-1", {"owner": owner, "account": account, "instrument": instrument})
    context = {
        "data_region": "eu",
        "delegation_depth": 0,
        "amount_minor": 250_000_00,
        "currency": "EUR",
        "instrument_class": "bond",
    }
    return order, context


def percentiles(samples_ns: list[int]) -> Row:
    ordered = sorted(samples_ns)
    return {
        "ops_s": 1e9 / statistics.mean(ordered),
        "p50_us": ordered[len(ordered) // 2] / 1000,
        "p99_us": ordered[int(len(ordered) * 0.99)] / 1000,
    }


# --------------------------------------------------------------------------- PEP in process


def _token_signer(key: ec.EllipticCurvePrivateKey) -> Signer:
    return Signer(key, "ES256", "k1", "at+jwt")


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "sub": "client-1",
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "nbf": now,
        "jti": uuid.uuid4().hex,
        "client_id": "client-1",
        "scope": "order:create",
        "lei": LEI,
    }


async def _pep_rows(n: int) -> list[Row]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [{**public_jwk(key), "kid": "k1", "alg": "ES256", "use": "sig"}]}
    fetcher = OutboundFetcher(
        transport=httpx.MockTransport(lambda _request: httpx.Response(200, json=jwks))
    )
    validator = TokenValidator(
        audience=AUDIENCE,
        issuers=[TrustedIssuer(ISSUER, jwks_uri=f"{ISSUER}/jwks")],
        fetcher=fetcher,
    )
    engine = PolicyEngine(issuer=ISSUER, served_regions=["eu"])
    engine.activate(compile_bundle(default_bundle()))
    enforcer = PolicyEnforcer(validator, engine, realm="bench")
    order, context = order_request()
    signer = _token_signer(key)
    fresh = [f"Bearer {signer.sign(_claims())}" for _ in range(n)]
    reused = fresh[0]

    async def pep(header: str) -> None:
        token = await enforcer.authenticate(header)
        await enforcer.authorize(token, "order:create", order, context, scope="order:create")

    for header in fresh[: min(200, n)]:  # warm-up: JWKS fetch, engine caches
        await pep(header)
    validator._verified.clear()

    def timed(fn: Any, items: list[Any]) -> list[int]:
        return [fn(item) for item in items]

    rows: list[Row] = []
    # Baseline 1: the raw ES256 verification of the same tokens (cryptography, DER conversion).
    public = key.public_key()
    raw = [_raw_parts(h.removeprefix("Bearer ")) for h in fresh]
    samples = []
    for data, der in raw:
        started = time.perf_counter_ns()
        public.verify(der, data, ec.ECDSA(hashes.SHA256()))
        samples.append(time.perf_counter_ns() - started)
    rows.append({"name": "baseline: raw ES256 verify (cryptography)", **percentiles(samples)})
    # Baseline 2: the engine's decide alone, same request.
    subject = Entity(
        "Client",
        "client-1",
        {"legal_entity": Entity("LegalEntity", LEI), "scopes": ["order:create"]},
        (Entity("LegalEntity", LEI),),
    )
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        await engine.decide(subject, "order:create", order, context)
        samples.append(time.perf_counter_ns() - started)
    rows.append({"name": "baseline: engine.decide alone (no recording)", **percentiles(samples)})
    samples = []
    for header in fresh:
        started = time.perf_counter_ns()
        await enforcer.authenticate(header)
        samples.append(time.perf_counter_ns() - started)
    rows.append({"name": "PEP validate only, new token per request", **percentiles(samples)})
    validator._verified.clear()
    for label, headers in (("new token per request", fresh), ("token reused", [reused] * n)):
        samples = []
        for header in headers:
            started = time.perf_counter_ns()
            await pep(header)
            samples.append(time.perf_counter_ns() - started)
        rows.append({"name": f"PEP validate+decide, {label}", **percentiles(samples)})
    await fetcher.aclose()
    return rows


def _raw_parts(token: str) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from trustplane.jose.jws import b64url_decode

    head, body, sig = token.split(".")
    raw = b64url_decode(sig)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return f"{head}.{body}".encode(), der


def bench_pep_validate_decide(n: int = 5000) -> list[Row]:
    return asyncio.run(_pep_rows(n))


# --------------------------------------------------------------------------- AuthZEN over HTTP


def _cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [str(BIN / "trustplane"), *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _wrk(url: str, body_file: Path, token: str, connections: int, duration: int) -> Row:
    out = subprocess.run(
        [*WRK, f"-c{connections}", f"-d{duration}s", url, "--", str(body_file), token],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def _access_token(issuer: str, client_id: str, pem: bytes, kid: str) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    now = int(time.time())
    assertion = Signer(key, "ES256", kid, "JWT").sign(  # type: ignore[arg-type]
        {
            "iss": client_id,
            "sub": client_id,
            "aud": issuer,
            "iat": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
        }
    )
    response = httpx.post(
        f"{issuer}/token",
        data={
            "grant_type": "client_credentials",
            "scope": "decision:evaluate",
            "resource": f"{issuer}/access/v1",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def _evaluation_json() -> dict[str, Any]:
    from trustplane.authzen.model import DecisionRequest
    from trustplane.authzen.wire import request_to_json

    order, context = order_request()
    owner = Entity("LegalEntity", LEI)
    subject = Entity("Client", "c-1", {"legal_entity": owner, "scopes": ["order:create"]}, (owner,))
    return request_to_json(DecisionRequest(subject, "order:create", order, context))


@contextmanager
def _served() -> Iterator[tuple[str, int, str, dict[str, Any], Path]]:
    """A ``trustplane serve`` (SQLite, one worker) with a PEP client registered: its issuer, pid,
    an access token for the PDP, the client and the working directory."""
    with tempfile.TemporaryDirectory(prefix="tp-bench-authzen-") as tmp:
        work = Path(tmp)
        port = free_port()
        issuer = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
        env.update(
            TRUSTPLANE_DATA_DIR=str(work),
            TRUSTPLANE_PORT=str(port),
            TRUSTPLANE_OPS_PORT=str(free_port()),
            TRUSTPLANE_LOG_LEVEL="warning",
        )
        _cli(env, "migrate")
        _cli(env, "clients", "keygen", "--out", str(work / "client"), "--kid", "bench-pep")
        client = json.loads(
            _cli(
                env,
                "clients",
                "add",
                "--lei",
                LEI,
                "--scope",
                "decision:evaluate",
                "--resource",
                f"{issuer}/access/v1",
                "--jwks-file",
                str(work / "client" / "jwks.json"),
                "--name",
                "bench pep",
                "--json",
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
        try:
            wait_ready(f"{issuer}/healthz", timeout=60.0)
            token = _access_token(
                issuer, client["client_id"], (work / "client" / "key.pem").read_bytes(), "bench-pep"
            )
            yield issuer, server.pid, token, client, work
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
            log.close()


def _wrk_rows(
    issuer: str, pid: int, token: str, work: Path, duration: int, connections: int, batch: int
) -> list[Row]:
    rows: list[Row] = []
    single = _evaluation_json()
    many = {**single, "evaluations": [{} for _ in range(batch)]}
    # The server's background loops (ledger, surveillance, caches) cost CPU whatever the load:
    # measured idle first, so that the figure per decision can be given without them too.
    before, started = process_tree_ticks(pid), time.monotonic()
    time.sleep(IDLE_SECONDS)
    idle_per_s = (process_tree_ticks(pid) - before) / TICK / (time.monotonic() - started)
    for label, path, body, per_request in (
        ("single evaluation", "evaluation", single, 1),
        (f"batch of {batch}", "evaluations", many, batch),
    ):
        body_file = work / f"{path}.json"
        body_file.write_text(json.dumps(body))
        url = f"{issuer}/access/v1/{path}"
        check = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert check.status_code == 200, check.text
        _wrk(url, body_file, token, connections, 2)  # warm-up, discarded
        before = process_tree_ticks(pid)
        result = _wrk(url, body_file, token, connections, duration)
        cpu_s = (process_tree_ticks(pid) - before) / TICK
        decisions = max(result["rps"] * duration * per_request, 1)
        rows.append(
            {
                "name": f"AuthZEN over HTTP, {label}",
                "ops_s": result["rps"] * per_request,
                "p50_us": result["p50_ms"] * 1000,
                "p99_us": result["p99_ms"] * 1000,
                "note": f"{result['rps']:.0f} req/s, server CPU "
                f"{1000 * cpu_s / decisions:.3f} ms/decision "
                f"({1000 * (cpu_s - idle_per_s * duration) / decisions:.3f} without the idle "
                f"{1000 * idle_per_s:.0f} ms/s), non-2xx {result['non_2xx']}",
            }
        )
    return rows


async def _client_rows(issuer: str, client: dict[str, Any], work: Path, n: int) -> list[Row]:
    """The PEP's side: AuthzenClient.decide against the live server, one at a time."""
    from trustplane.outbound import OutboundPolicy
    from trustplane.pep import AuthzenClient, PrivateKeyJwt

    key = serialization.load_pem_private_key(
        (work / "client" / "key.pem").read_bytes(), password=None
    )
    fetcher = OutboundFetcher(OutboundPolicy.development())
    pdp = AuthzenClient(
        issuer,
        token_endpoint=f"{issuer}/token",
        auth=PrivateKeyJwt(client["client_id"], key, "bench-pep", issuer),  # type: ignore[arg-type]
        fetcher=fetcher,
    )
    order, context = order_request()
    owner = Entity("LegalEntity", LEI)
    subject = Entity("Client", "c-1", {"legal_entity": owner, "scopes": ["order:create"]}, (owner,))
    try:
        for _ in range(200):  # warm-up: the client-credentials token, the connection
            decision = await pdp.decide(subject, "order:create", order, context)
            assert decision.allowed, decision
        samples = []
        cpu = time.process_time()
        for _ in range(n):
            started = time.perf_counter_ns()
            await pdp.decide(subject, "order:create", order, context, correlation_id="bench")
            samples.append(time.perf_counter_ns() - started)
        cpu = time.process_time() - cpu
    finally:
        await fetcher.aclose()
    return [
        {
            "name": "AuthzenClient.decide, sequential",
            **percentiles(samples),
            "note": f"client CPU {1000 * cpu / n:.3f} ms/decision",
        }
    ]


async def _callers_rows(
    issuer: str, pid: int, client: dict[str, Any], work: Path, callers: list[int], n: int
) -> list[Row]:
    """``n`` decisions per row from ``c`` concurrent callers sharing one ``AuthzenClient``."""
    from prometheus_client import REGISTRY

    from trustplane.outbound import OutboundPolicy
    from trustplane.pep import AuthzenClient, PrivateKeyJwt

    key = serialization.load_pem_private_key(
        (work / "client" / "key.pem").read_bytes(), password=None
    )
    fetcher = OutboundFetcher(OutboundPolicy.development())
    pdp = AuthzenClient(
        issuer,
        token_endpoint=f"{issuer}/token",
        auth=PrivateKeyJwt(client["client_id"], key, "bench-pep", issuer),  # type: ignore[arg-type]
        fetcher=fetcher,
    )
    order, context = order_request()
    owner = Entity("LegalEntity", LEI)
    subject = Entity("Client", "c-1", {"legal_entity": owner, "scopes": ["order:create"]}, (owner,))
    sent = {"purpose": "pep_pdp", "outcome": "ok"}

    async def caller(quota: int, samples: list[int]) -> None:
        for i in range(quota):
            started = time.perf_counter_ns()
            decision = await pdp.decide(
                subject, "order:create", order, context, correlation_id=f"bench-{i}"
            )
            samples.append(time.perf_counter_ns() - started)
            assert decision.allowed, decision

    rows: list[Row] = []
    try:
        await asyncio.gather(*(caller(50, []) for _ in range(4)))  # warm-up: token, connections
        before, started = process_tree_ticks(pid), time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)
        idle_per_s = (process_tree_ticks(pid) - before) / TICK / (time.monotonic() - started)
        for c in callers:
            samples: list[int] = []
            requests = REGISTRY.get_sample_value("trustplane_outbound_fetch_total", sent) or 0.0
            server, cpu, wall = process_tree_ticks(pid), time.process_time(), time.monotonic()
            await asyncio.gather(*(caller(n // c, samples) for _ in range(c)))
            wall, cpu = time.monotonic() - wall, time.process_time() - cpu
            server_s = (process_tree_ticks(pid) - server) / TICK
            requests = (
                REGISTRY.get_sample_value("trustplane_outbound_fetch_total", sent) or 0.0
            ) - requests
            done = len(samples)
            rows.append(
                {
                    "name": f"AuthzenClient.decide, {c} concurrent callers",
                    **percentiles(samples),
                    "ops_s": done / wall,
                    "note": f"client CPU {1000 * cpu / done:.3f} ms/decision, server CPU "
                    f"{1000 * server_s / done:.3f} ms/decision "
                    f"({1000 * (server_s - idle_per_s * wall) / done:.3f} without the idle "
                    f"{1000 * idle_per_s:.0f} ms/s), {done / max(requests, 1):.1f} decisions/request",
                }
            )
    finally:
        await fetcher.aclose()
    return rows


def bench_authzen_callers(callers: list[int], n: int = 2000) -> list[Row]:
    with _served() as (issuer, pid, _token, client, work):
        return asyncio.run(_callers_rows(issuer, pid, client, work, callers, n))


def bench_authzen_http(
    duration: int = 10, connections: int = 16, batch: int = 10, client_n: int = 2000
) -> list[Row]:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is required for the AuthZEN HTTP benchmark (apt-get install wrk)")
    with _served() as (issuer, pid, token, client, work):
        rows = _wrk_rows(issuer, pid, token, work, duration, connections, batch)
        rows += asyncio.run(_client_rows(issuer, client, work, client_n))
    return rows


async def _handler_rows(n: int) -> list[Row]:
    """The AuthZEN handler as an ASGI call (no network, no uvicorn) over an engine that does not
    record: what the HTTP layer itself costs per decision, next to ``decide`` alone."""
    from trustplane.app import Services
    from trustplane.policy.http import AuthzenHttp
    from trustplane.settings import Settings
    from trustplane.storage.migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="tp-bench-handler-") as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/t.db"
        settings = Settings(issuer="http://127.0.0.1:9", database_url=url, data_dir=Path(tmp))
        svc = Services.build(settings)
        await upgrade(svc.db)
        await svc.start()
        try:
            return await _handler_measure(svc, AuthzenHttp, n)
        finally:
            await svc.stop()


async def _handler_measure(svc: Any, authzen_http: Any, n: int) -> list[Row]:
    from trustplane.protocol.tokens import issue_access_token

    audience = f"{svc.settings.issuer}/access/v1"
    client = await svc.clients.register(
        {
            "lei": LEI,
            "scope": "decision:evaluate",
            "allowed_resources": [audience],
            "jwks": {"keys": [{**public_jwk(ec.generate_private_key(ec.SECP256R1())), "kid": "k"}]},
        },
        initial_access_token=None,
    )
    token = issue_access_token(
        svc.keys.ring,
        issuer=svc.settings.issuer,
        subject=client.client.client_id,
        client_id=client.client.client_id,
        audience=audience,
        scopes=("decision:evaluate",),
        lifetime=600,
    ).token
    engine = PolicyEngine(issuer=svc.settings.issuer, served_regions=["eu"])
    engine.activate(compile_bundle(default_bundle()))
    from trustplane.app import bearer_guard

    app = authzen_http(engine, bearer_guard(svc))
    handler = next(r.endpoint for r in app.routes() if r.path == "/access/v1/evaluation")
    body = json.dumps(_evaluation_json()).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/access/v1/evaluation",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
    }
    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def call() -> None:
        response = await handler(Request(scope, receive))
        await response(scope, receive, send)

    for _ in range(200):
        await call()
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - started)
    assert set(statuses) == {200}, statuses
    return [
        {"name": "AuthZEN handler in process (no network, no recording)", **percentiles(samples)}
    ]


def bench_authzen_handler(n: int = 3000) -> list[Row]:
    return asyncio.run(_handler_rows(n))


def print_rows(rows: list[Row]) -> None:
    print(f"{'benchmark':<52} {'ops/s':>10} {'p50 us':>9} {'p99 us':>9}  note")
    for row in rows:
        print(
            f"{row['name']:<52} {row['ops_s']:>10.0f} {row['p50_us']:>9.1f} "
            f"{row['p99_us']:>9.1f}  {row.get('note', '')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=["pep", "authzen", "http", "callers"],
        help="pep: in process; authzen: the handler and HTTP; http: HTTP only (server and client); "
        "callers: concurrent AuthzenClient callers",
    )
    parser.add_argument(
        "--callers", default="1,4,16", help="concurrent callers per row of --only callers"
    )
    parser.add_argument("-n", type=int, default=5000, help="PEP requests per measurement")
    parser.add_argument("--duration", type=int, default=10, help="wrk seconds per AuthZEN run")
    parser.add_argument("-c", "--connections", type=int, default=16)
    args = parser.parse_args()
    rows: list[Row] = []
    if args.only in (None, "pep"):
        rows += bench_pep_validate_decide(args.n)
    if args.only in (None, "authzen"):
        rows += bench_authzen_handler(args.n)
    if args.only in (None, "authzen", "http"):
        rows += bench_authzen_http(args.duration, args.connections, client_n=args.n)
    if args.only == "callers":
        rows += bench_authzen_callers([int(c) for c in args.callers.split(",")], args.n)
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}, {os.cpu_count()} CPUs")
    print_rows(rows)


if __name__ == "__main__":
    main()
