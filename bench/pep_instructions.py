#!/usr/bin/env python3
"""Instruction counts of the PEP's per-request work, for ``valgrind --tool=callgrind`` (docs/pep.md,
"A service request's PEP instructions"). Every run signs the same ``NMAX`` ES256 access tokens
(new ``jti`` each) and warms up on five of them; only the ``N`` counted requests differ, so
``(Ir(N) - Ir(0)) / N`` is one request's instructions whatever the start-up costs.

  validate  ``PolicyEnforcer.authenticate`` with a new token per request (header, RFC 9068 checks,
            the ES256 signature)
  pair      the same plus ``authorize`` with the in-process ``PolicyEngine`` (the bench's
            ``order:create`` request, no recording)
  service   ``POST /orders`` into the reference service app (``build_app``) as raw ASGI, a new
            token and a new ``Idempotency-Key`` per request, the PDP an in-process allow, the
            stores on SQLite (a temporary file): the PEP guard, the key's claim and completion,
            and the store's transition

  PYTHONHASHSEED=0 PYTHONPATH=src valgrind --tool=callgrind \\
      python bench/pep_instructions.py service 200     # and ... service 0
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.jose.jws import Signer
from trustplane.keys.crypto import public_jwk
from trustplane.pep import OutboundFetcher, PolicyEnforcer, TokenValidator, TrustedIssuer

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

NMAX = int(os.environ.get("NMAX", "600"))
ISSUER, AUDIENCE, LEI = "https://as.bench", "https://execution.example/api", "5493001KJTIIGC8Y1R12"
SCOPES = "order:create trade:execute allocation:propose"
KEY = ec.derive_private_key(0x5EC0DE, ec.SECP256R1())  # fixed: the same key in every run


def claims(i: int) -> dict[str, Any]:
    """A day's lifetime: under callgrind on a loaded machine, start-up alone can outlast minutes."""
    now = int(time.time())
    return {
        "iss": ISSUER, "sub": "client-1", "aud": AUDIENCE, "exp": now + 86_400, "iat": now,
        "nbf": now, "jti": f"{i:032x}", "client_id": "client-1", "scope": SCOPES, "lei": LEI,
        "txn": "txn-1", "mandate": {"id": "M-1", "version": 1}, "act": {"sub": "arranger-svc"},
    }  # fmt: skip


def validator() -> tuple[TokenValidator, OutboundFetcher]:
    jwks = {"keys": [{**public_jwk(KEY), "kid": "k1", "alg": "ES256", "use": "sig"}]}
    transport = httpx.MockTransport(lambda _r: httpx.Response(200, json=jwks))
    fetcher = OutboundFetcher(transport=transport)
    trusted = TrustedIssuer(ISSUER, jwks_uri=f"{ISSUER}/jwks")
    return TokenValidator(audience=AUDIENCE, issuers=[trusted], fetcher=fetcher), fetcher


async def pep_only(mode: str, n: int, headers: list[str]) -> None:
    from pdp_http import order_request

    from trustplane.policy.bundle import compile_bundle, default_bundle
    from trustplane.policy.engine import PolicyEngine

    checker, fetcher = validator()
    engine = PolicyEngine(issuer=ISSUER, served_regions=["eu"])
    engine.activate(compile_bundle(default_bundle()))
    enforcer = PolicyEnforcer(checker, engine, realm="bench")
    order, context = order_request()

    async def one(header: str, decide: bool) -> None:
        token = await enforcer.authenticate(header)
        if decide:
            await enforcer.authorize(token, "order:create", order, context, scope="order:create")

    for header in headers[-5:]:
        await one(header, True)
    for header in headers[:n]:
        await one(header, mode == "pair")
    await fetcher.aclose()


async def service(n: int, tokens: list[str]) -> None:
    from tests.reference.conftest import ORDER, Mandates, RecordingPdp, fresh_store
    from tests.reference.test_http import AuthzenShape
    from trustplane.pep import IdempotencyService, SqlIdempotencyStore, serialize_key
    from trustplane.pep.http import Pep
    from trustplane.reference.http import build_app
    from trustplane.reference.services import TradeServices

    store = await fresh_store(f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/ref.db")
    keys = SqlIdempotencyStore(store.db)
    await keys.create_schema()
    checker, fetcher = validator()
    pep = Pep(PolicyEnforcer(checker, AuthzenShape(RecordingPdp()), realm="settlement"))
    app = build_app(TradeServices(store, Mandates()), pep, IdempotencyService(keys))
    body = orjson.dumps(ORDER)

    async def call(token: str, key: str) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/orders", "raw_path": b"/orders", "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 5000), "server": ("ref.test", 80),
            "headers": [
                (b"host", b"ref.test"), (b"authorization", f"Bearer {token}".encode()),
                (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                (b"idempotency-key", serialize_key(key).encode()),
            ],
        }  # fmt: skip
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)  # no disconnect while the request runs
            raise AssertionError

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        return status[0]

    for i, token in enumerate(tokens[-5:]):
        assert await call(token, f"warm-{i}") == 201
    for i, token in enumerate(tokens[:n]):
        assert await call(token, f"k-{i}") == 201
    await fetcher.aclose()
    await store.db.dispose()


def main() -> None:
    mode, n = sys.argv[1], int(sys.argv[2])
    signer = Signer(KEY, "ES256", "k1", "at+jwt")
    tokens = [signer.sign(claims(i)) for i in range(NMAX + 5)]
    if mode == "service":
        asyncio.run(service(n, tokens))
    else:
        asyncio.run(pep_only(mode, n, [f"Bearer {t}" for t in tokens]))


if __name__ == "__main__":
    main()
