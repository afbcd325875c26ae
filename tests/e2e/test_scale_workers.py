"""Several worker processes on the embedded SQLite default (docs/operations.md "Several workers on
SQLite"): concurrent token requests over many connections all succeed, nothing reports "database is
locked", and every single-use assertion ``jti`` is consumed exactly once, even when its replay lands
on the other worker."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import httpx
import jwt

from tests.conftest import EXECUTION
from tests.e2e.conftest import LiveServers, introspect, register_client

REQUESTS = 200
CONNECTIONS = 16


async def _load(base_url: str, bodies: list[dict[str, str]]) -> list[httpx.Response]:
    """``bodies`` posted to /token over ``CONNECTIONS`` connections at once; each connection opened
    anew per request so the kernel spreads them over the workers."""
    queue: asyncio.Queue[tuple[int, dict[str, str]]] = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    answers: list[httpx.Response | None] = [None] * len(bodies)

    async def connection() -> None:
        while not queue.empty():
            i, body = queue.get_nowait()
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
                answers[i] = await http.post("/token", data=body)

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def test_two_workers_on_sqlite_share_one_database(live_server: LiveServers) -> None:
    server = live_server.start(workers="2")
    kit = register_client(server)
    auths = [kit.auth() for _ in range(REQUESTS)]
    body = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}

    answers = asyncio.run(_load(server.base_url, [{**body, **a} for a in auths]))
    assert [a.status_code for a in answers] == [200] * REQUESTS, {
        a.status_code: a.text for a in answers if a.status_code != 200
    }
    # replays of the same assertions, new connection each: whichever worker takes one, the jti
    # was consumed (by either worker) and is refused
    replays = asyncio.run(_load(server.base_url, [{**body, **a} for a in auths[:40]]))
    for replay in replays:
        assert replay.status_code == 401, replay.text
        assert replay.json()["error"] == "invalid_client"
    # every acknowledged token is known to the database (introspection may land on either worker)
    for answer in answers[:: REQUESTS // 20]:
        assert introspect(server, kit, answer.json()["access_token"])["active"] is True
    assert "database is locked" not in server.log()
    assert "Traceback" not in server.log()
    # each of the 200 assertions' jti is stored (once: it is the primary key with the issuer)
    jtis = {
        jwt.decode(a["client_assertion"], options={"verify_signature": False})["jti"] for a in auths
    }
    db = Path(server.env["TRUSTPLANE_DATA_DIR"]) / "trustplane.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored = {jti for (jti,) in conn.execute("SELECT jti FROM used_jtis")}
    assert jtis <= stored
