#!/usr/bin/env python3
"""What one AuthZEN decision costs the PDP server, counted: the app of ``create_app`` (the
composition root, every decision recorded through the group-commit writer) on a real SQLite or
PostgreSQL store, driven as raw ASGI calls (no socket, no uvicorn) with the request the reference
services' PEP SDK sends for a trade step (``AuthzenClient``: its headers, a bearer token of the
deployment for ``{issuer}/access/v1``, the evaluation with its ``correlation_id``).

Meant to run under callgrind twice, ``-n 0`` and ``-n N``: the difference divided by N is the
instructions per decision (start-up, the warm-up and the process's end cancel out)::

  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg0 python bench/pdp_serve_count.py -n 0
  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg1 python bench/pdp_serve_count.py -n 400

``--profile FILE``: cProfile of the N decisions only (call counts). ``--db URL``: a PostgreSQL
database (migrated and emptied here) instead of a fresh SQLite file. Every answer is checked: a 200
allow naming ``trade.lifecycle``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import orjson

LEI = "5493001KJTIIGC8Y1R12"
WARM_UP = 50


def _evaluation(trade_id: str, client_id: str, correlation_id: str) -> bytes:
    """``AuthzenClient._evaluation`` of the execution service's ``trade:execute`` step."""
    from trustplane.authzen.model import DecisionRequest, Entity
    from trustplane.authzen.wire import request_to_json

    owner = Entity("LegalEntity", LEI)
    subject = Entity(
        "Client", client_id, {"scopes": ["trade:execute"], "legal_entity": owner}, (owner,)
    )
    trade = Entity(
        "Trade",
        trade_id,
        {
            "state": "created",
            "account": "ACC-1",
            "instrument": "XS0000000001",
            "side": "buy",
            "currency": "EUR",
        },
    )
    context = {
        "trade_state": "created",
        "transition": "execute",
        "actor": client_id,
        "txn": f"txn-{trade_id}",
        "trade_txn": f"txn-{trade_id}",
    }
    body = request_to_json(DecisionRequest(subject, "trade:execute", trade, context))
    body["correlation_id"] = correlation_id
    return orjson.dumps(body)


async def run(n: int, database_url: str | None, profile: str | None) -> None:
    from trustplane import app as app_module
    from trustplane.app import Services, create_app
    from trustplane.keys.crypto import new_kek_text, public_jwk
    from trustplane.protocol.tokens import issue_access_token
    from trustplane.settings import Settings
    from trustplane.storage.db import Database
    from trustplane.storage.migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="tp-pdp-count-") as tmp:
        url = database_url or f"sqlite+aiosqlite:///{tmp}/t.db"
        db = Database(url)
        await upgrade(db)
        await db.dispose()
        settings = Settings(
            issuer="http://127.0.0.1:9",
            database_url=url,
            data_dir=Path(tmp),
            log_level="warning",
            cache_refresh_interval=60,
            key_encryption_key=None if database_url is None else new_kek_text(),
        )
        svc = Services.build(settings)
        # the minute-by-minute maintenance would run in a callgrind run's stretched wall time and
        # be counted as the decisions' cost: pushed out of the run
        app_module.MAINTENANCE_INTERVAL = 24 * 3600
        app = create_app(settings, services=svc)
        async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
            from cryptography.hazmat.primitives.asymmetric import ec

            audience = f"{settings.issuer}/access/v1"
            key = ec.generate_private_key(ec.SECP256R1())
            registered = await svc.clients.register(
                {
                    "lei": LEI,
                    "scope": "decision:evaluate",
                    "allowed_resources": [audience],
                    "jwks": {"keys": [{**public_jwk(key), "kid": "k"}]},
                },
                initial_access_token=None,
            )
            await svc.refresh_caches({})
            client_id = registered.client.client_id
            token = issue_access_token(
                svc.keys.ring,
                issuer=settings.issuer,
                subject=client_id,
                client_id=client_id,
                audience=audience,
                scopes=("decision:evaluate",),
                lifetime=3600,
                extra={"lei": LEI},
            ).token
            await _drive(app, token, client_id, "warm", WARM_UP)
            profiler = cProfile.Profile() if profile else None
            if profiler:
                profiler.enable()
            await _drive(app, token, client_id, "run", n)
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)  # type: ignore[arg-type]


async def _drive(app: Any, token: str, client_id: str, tag: str, n: int) -> None:
    bodies = [_evaluation(f"T-{tag}-{i}", client_id, f"req-{tag}-{i}") for i in range(n)]
    for i, body in enumerate(bodies):
        headers = [
            (b"host", b"127.0.0.1:9"),
            (b"content-type", b"application/json"),
            (b"accept", b"application/json"),
            (b"x-request-id", f"req-{tag}-{i}".encode()),
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/access/v1/evaluation",
            "raw_path": b"/access/v1/evaluation",
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 9),
            "state": {},
        }
        sent: list[MutableMapping[str, Any]] = []

        async def receive(body: bytes = body) -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any], sent: list[Any] = sent) -> None:
            sent.append(message)

        await app(scope, receive, send)
        answer = orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        if sent[0]["status"] != 200 or answer.get("decision") is not True:
            raise SystemExit(f"unexpected answer {sent[0]['status']} {answer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=400, help="decisions after the warm-up")
    parser.add_argument("--db", help="a PostgreSQL URL (default: a fresh SQLite file)")
    parser.add_argument("--profile", help="cProfile output file for the N decisions")
    args = parser.parse_args()
    asyncio.run(run(args.n, args.db, args.profile))
    print(f"{args.n} decisions answered", file=sys.stderr)


if __name__ == "__main__":
    main()
