"""RFC 7592 client management over HTTP: what the answers carry, who may change what, and races.

The client configuration endpoint reads the client from the database, not the in-memory registry:
another process (the CLI, another worker) may have deleted or disabled it a moment ago, and the
registry only catches up within ``cache_refresh_interval``. Such changes are made here through the
store without reloading the registry, as that other process would.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import orjson
import pytest
from sqlalchemy import update

from tests.clients.test_registration import (
    bearer,
    client_count,
    error_of,
    initial_token,
    metadata,
    registered,
    secret_metadata,
)
from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key
from tests.protocol_server import Server, basic
from trustplane.clients.model import Client, ClientStatus
from trustplane.clients.store import SqlClientStore
from trustplane.clients.tables import clients

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def stored(server: Server, client_id: str) -> Client | None:
    async with server.services.db.read() as conn:
        return await SqlClientStore().get(conn, client_id)


async def disable_elsewhere(server: Server, client_id: str) -> None:
    """``trustplane clients disable`` run in another process: this process's registry is stale."""
    client = await stored(server, client_id)
    assert client is not None
    async with server.services.db.transaction() as conn:
        assert await SqlClientStore().replace(conn, replace(client, status=ClientStatus.DISABLED))
    assert server.services.clients.registry.get(client_id).active  # type: ignore[union-attr]


async def delete_elsewhere(server: Server, client_id: str) -> None:
    """Delete the client as another process would, leaving this process's registry stale: on
    PostgreSQL the pushed invalidation may already have removed it, so it is put back (what a
    process whose notification has not arrived yet still holds)."""
    registry = server.services.clients.registry
    stale = registry.get(client_id)
    assert stale is not None
    async with server.services.db.transaction() as conn:
        assert await SqlClientStore().delete(conn, client_id)
    await asyncio.sleep(0)
    registry._by_id[client_id] = stale


def put_body(reg: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The registration as returned, minus what §2.2 forbids sending back, plus ``changes``."""
    forbidden = {
        "registration_access_token",
        "registration_client_uri",
        "client_secret_expires_at",
        "client_id_issued_at",
        "client_secret",
    }
    body = {k: v for k, v in reg.items() if k not in forbidden}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


# --------------------------------------------------------------------------- §3: the answers


async def test_read_and_update_answers_carry_the_registration_access_token(server: Server) -> None:
    """RFC 7592 §3: ``registration_access_token`` and ``registration_client_uri`` are REQUIRED in
    every client information response; the token is the one presented (it is not rotated)."""
    reg = await registered(server)
    token, uri = reg["registration_access_token"], reg["registration_client_uri"]

    read = await server.http.get(uri, headers=bearer(token))
    put = await server.http.put(
        uri, json=put_body(reg, client_name="renamed"), headers=bearer(token)
    )

    for response in (read, put):
        assert response.status_code == 200, response.text
        assert response.json()["registration_access_token"] == token
        assert response.json()["registration_client_uri"] == uri
        assert response.headers["cache-control"] == "no-store"
    assert put.json()["client_name"] == "renamed"
    again = await server.http.get(uri, headers=bearer(token))
    assert again.json()["client_name"] == "renamed"


async def test_secret_client_answers_carry_client_secret_expires_at(server: Server) -> None:
    """RFC 7591 §3.2.1: ``client_secret_expires_at`` is REQUIRED when a secret was issued (0: it
    does not expire); the secret itself is shown once, at registration."""
    reg = await registered(server, secret_metadata())
    token, uri = reg["registration_access_token"], reg["registration_client_uri"]

    read = await server.http.get(uri, headers=bearer(token))
    put = await server.http.put(uri, json=put_body(reg), headers=bearer(token))

    for response in (read, put):
        assert response.status_code == 200, response.text
        assert response.json()["client_secret_expires_at"] == 0
        assert "client_secret" not in response.json()


async def test_key_client_answers_carry_no_secret_fields(server: Server) -> None:
    reg = await registered(server)
    read = await server.http.get(
        reg["registration_client_uri"], headers=bearer(reg["registration_access_token"])
    )
    assert read.status_code == 200, read.text
    assert {"client_secret", "client_secret_expires_at"} & read.json().keys() == set()


# --------------------------------------------------------------------------- §2.2: the update


async def test_put_removes_omitted_fields(server: Server) -> None:
    """§2.2: omitted fields are treated as empty, so they leave the registration."""
    reg = await registered(server)
    body = put_body(reg, client_name=None)

    put = await server.http.put(
        reg["registration_client_uri"], json=body, headers=bearer(reg["registration_access_token"])
    )

    assert put.status_code == 200, put.text
    assert "client_name" not in put.json()
    client = await stored(server, reg["client_id"])
    assert client is not None
    assert "client_name" not in client.metadata


async def test_put_with_the_current_secret_keeps_it(server: Server) -> None:
    """§2.2: a ``client_secret`` in the body must be the current one; the secret never changes."""
    reg = await registered(server, secret_metadata())
    client_id, secret = reg["client_id"], reg["client_secret"]

    put = await server.http.put(
        reg["registration_client_uri"],
        json=put_body(reg, client_secret=secret, client_name="kept"),
        headers=bearer(reg["registration_access_token"]),
    )

    assert put.status_code == 200, put.text
    assert "client_secret" not in put.json()
    form = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
    token = await server.http.post("/token", data=form, headers=basic(client_id, secret))
    assert token.status_code == 200, token.text


REFUSED_PUT = [
    pytest.param(
        lambda r: put_body(r, registration_client_uri=r["registration_client_uri"]),
        id="registration_client_uri-sent",
    ),
    pytest.param(lambda r: put_body(r, client_secret_expires_at=0), id="client_secret_expires_at"),
    pytest.param(lambda r: put_body(r, client_secret="chosen-by-the-client"), id="secret-chosen"),
    pytest.param(lambda r: put_body(r, client_secret=12345), id="secret-not-a-string"),
    pytest.param(lambda r: put_body(r, lei="529900T8BM49AURSDO55"), id="lei-changed"),
    pytest.param(lambda r: put_body(r, lei=LEI.lower()), id="lei-not-canonical"),
    pytest.param(lambda r: put_body(r, client_id=r["client_id"] + " "), id="client_id-padded"),
    pytest.param(lambda r: put_body(r, client_id=None), id="client_id-missing"),
]


@pytest.mark.parametrize("case", REFUSED_PUT)
@pytest.mark.parametrize("kind", ["secret", "keys"])
async def test_refused_put_writes_nothing(server: Server, case: Any, kind: str) -> None:
    reg = await registered(server, secret_metadata() if kind == "secret" else metadata())
    before = await stored(server, reg["client_id"])

    put = await server.http.put(
        reg["registration_client_uri"],
        json=case(reg),
        headers=bearer(reg["registration_access_token"]),
    )

    assert error_of(put) == (400, "invalid_client_metadata"), put.text
    assert await stored(server, reg["client_id"]) == before


# --------------------------------------------------------------------------- 401 and 403


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_an_operator_client_is_not_managed_over_rfc7592(server: Server, method: str) -> None:
    """A client from ``trustplane clients add`` has no registration access token: no token opens
    its configuration endpoint (another client's, an empty-looking one)."""
    other = await registered(server)
    client_id = server.kit.client_id
    before = await stored(server, client_id)
    for token in (other["registration_access_token"], "-", client_id):
        response = await server.http.request(
            method,
            f"/register/{client_id}",
            json=put_body(other, client_id=client_id) if method == "PUT" else None,
            headers=bearer(token),
        )

        assert error_of(response) == (401, "invalid_token"), response.text
    assert await stored(server, client_id) == before


async def test_put_does_not_undo_an_operator_disable(server: Server) -> None:
    """Trust boundary: the operator disabled the client (in another process); an update with the
    client's own token must neither re-enable it nor change it (403), however stale the registry."""
    key = new_ec_key()
    reg = await registered(server, metadata(jwks=jwks_for(key)))
    await disable_elsewhere(server, reg["client_id"])
    before = await stored(server, reg["client_id"])

    put = await server.http.put(
        reg["registration_client_uri"],
        json=put_body(reg, client_name="back again"),
        headers=bearer(reg["registration_access_token"]),
    )

    assert error_of(put) == (403, "access_denied"), put.text
    after = await stored(server, reg["client_id"])
    assert after == before
    assert after is not None
    assert after.status is ClientStatus.DISABLED
    await server.services.clients.load()
    kit = ClientKit(reg["client_id"], key, server.issuer)
    assert error_of(await server.token(kit)) == (401, "invalid_client")


async def test_disabled_client_may_read_but_not_change_or_delete(server: Server) -> None:
    """RFC 7592 §2.2, §2.3: a client not allowed to change its registration gets 403."""
    reg = await registered(server)
    await disable_elsewhere(server, reg["client_id"])
    await server.services.clients.load()
    uri, headers = reg["registration_client_uri"], bearer(reg["registration_access_token"])

    read = await server.http.get(uri, headers=headers)
    delete = await server.http.delete(uri, headers=headers)

    assert read.status_code == 200, read.text
    assert read.json()["client_id"] == reg["client_id"]
    assert error_of(delete) == (403, "access_denied"), delete.text
    assert await stored(server, reg["client_id"]) is not None


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_a_client_deleted_elsewhere_is_401(server: Server, method: str) -> None:
    """§2.1-§2.3: a client that does not exist is 401, even while this process's registry still
    lists it (deleted by another worker), never its old metadata nor a 500."""
    reg = await registered(server)
    await delete_elsewhere(server, reg["client_id"])
    before = await client_count(server)

    response = await server.http.request(
        method,
        reg["registration_client_uri"],
        json=put_body(reg) if method == "PUT" else None,
        headers=bearer(reg["registration_access_token"]),
    )

    assert error_of(response) == (401, "invalid_token"), response.text
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert await client_count(server) == before


async def test_racing_deletes_one_wins(server: Server) -> None:
    """Two deletes with the client's token at once: one 204, the other as for an unknown client."""
    for _ in range(3):
        reg = await registered(server)
        uri, headers = reg["registration_client_uri"], bearer(reg["registration_access_token"])

        responses = await asyncio.gather(*(server.http.delete(uri, headers=headers) for _ in "ab"))

        outcomes = sorted(
            (r.status_code, r.json()["error"] if r.content else "") for r in responses
        )
        assert outcomes == [(204, ""), (401, "invalid_token")], [r.text for r in responses]
        assert await stored(server, reg["client_id"]) is None


async def test_racing_update_and_delete(server: Server) -> None:
    """An update racing a delete either lands first (200, then 204) or finds the client gone
    (401); the client ends deleted either way and nothing answers 500."""
    for _ in range(3):
        reg = await registered(server)
        uri, headers = reg["registration_client_uri"], bearer(reg["registration_access_token"])

        put, delete = await asyncio.gather(
            server.http.put(uri, json=put_body(reg, client_name="racing"), headers=headers),
            server.http.delete(uri, headers=headers),
        )

        assert delete.status_code == 204, delete.text
        assert put.status_code == 200 or error_of(put) == (401, "invalid_token"), put.text
        assert await stored(server, reg["client_id"]) is None


async def test_racing_updates_leave_one_whole_replacement(server: Server) -> None:
    """Two full replacements at once: both succeed and the stored metadata is exactly one of them
    (never a mix, never the status or another column written back)."""
    for _ in range(3):
        reg = await registered(server)
        uri, headers = reg["registration_client_uri"], bearer(reg["registration_access_token"])
        bodies = [
            put_body(reg, client_name="first", scope="order:create"),
            put_body(reg, client_name="second", scope="order:cancel"),
        ]

        responses = await asyncio.gather(
            *(server.http.put(uri, json=b, headers=headers) for b in bodies)
        )

        assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
        after = await stored(server, reg["client_id"])
        assert after is not None
        assert after.status is ClientStatus.ACTIVE
        named = (after.metadata["client_name"], after.metadata["scope"])
        assert named in {("first", "order:create"), ("second", "order:cancel")}


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PATCH", "/register/{id}"),
        ("POST", "/register/{id}"),
        ("GET", "/register"),
        ("DELETE", "/register"),
    ],
)
async def test_other_methods_are_405(server: Server, method: str, path: str) -> None:
    """Nothing is changed. (Starlette's ``Allow`` names only the first route matching the path,
    ``GET`` for ``/register/{id}``: RFC 9110 §15.5.6 wants all three; left to the app's router.)"""
    reg = await registered(server)
    response = await server.http.request(
        method,
        path.format(id=reg["client_id"]),
        headers=bearer(reg["registration_access_token"]),
        json=put_body(reg),
    )

    assert response.status_code == 405, response.text
    assert await stored(server, reg["client_id"]) is not None


# --------------------------------------------------------------------------- RFC 7591 §3


@pytest.mark.parametrize("uses", [1, 3])
async def test_racing_registrations_spend_a_limited_token_exactly(
    server: Server, uses: int
) -> None:
    """An initial access token limited to N registrations registers exactly N clients, however
    many requests race for it (the conditional UPDATE of ``use``; PostgreSQL runs them at once)."""
    token = await initial_token(server, max_uses=uses)
    before = await client_count(server)

    responses = await asyncio.gather(
        *(server.http.post("/register", json=metadata(), headers=bearer(token)) for _ in range(6))
    )

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * uses + [401] * (6 - uses), [r.text for r in responses]
    assert {r.json()["error"] for r in responses if r.status_code == 401} == {"invalid_token"}
    assert await client_count(server) == before + uses


# --------------------------------------------------------------------------- §2.3: what delete ends


async def test_delete_ends_the_clients_access_tokens(server: Server) -> None:
    """RFC 7592 §2.3 SHOULD: a deleted client's access tokens already issued introspect as
    inactive (the module's client is the operator-made resource server for the audience)."""
    key = new_ec_key()
    reg = await registered(server, metadata(jwks=jwks_for(key)))
    access_token = await server.access_token(ClientKit(reg["client_id"], key, server.issuer))

    async def active() -> bool:
        form = {"token": access_token, **server.kit.auth()}
        response = await server.http.post("/introspect", data=form)
        assert response.status_code == 200, response.text
        return bool(response.json()["active"])

    assert await active()
    deleted = await server.http.delete(
        reg["registration_client_uri"], headers=bearer(reg["registration_access_token"])
    )
    assert deleted.status_code == 204, deleted.text
    assert not await active()


# --------------------------------------------------------------------------- the operator's side


class _UpdateLandsFirst:
    """The service's store, except that an RFC 7592 update of ``client_id`` commits (on its own
    connection) just before the operator's status write: the race of a PUT with ``clients
    disable``, made deterministic."""

    def __init__(self, store: Any, server: Server, client_id: str, metadata: dict[str, Any]):
        self._store, self._server = store, server
        self._client_id, self._metadata = client_id, metadata

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _update_first(self) -> None:
        """What the RFC 7592 update writes: the metadata column (as one plain UPDATE here)."""
        async with self._server.services.db.transaction() as conn:
            await conn.execute(
                update(clients)
                .where(clients.c.client_id == self._client_id)
                .values(metadata=orjson.dumps(self._metadata).decode())
            )

    async def replace(self, conn: Any, client: Client) -> bool:
        await self._update_first()
        return bool(await self._store.replace(conn, client))

    async def set_status(self, conn: Any, *args: Any) -> bool:
        await self._update_first()
        return bool(await self._store.set_status(conn, *args))


async def test_an_operator_disable_keeps_an_update_committed_meanwhile(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trustplane clients disable`` writes the status alone: an update the client committed
    between the operator's read and write (answered 200) is not reverted."""
    reg = await registered(server)
    client = await stored(server, reg["client_id"])
    assert client is not None
    changed = {**client.metadata, "client_name": "committed meanwhile"}
    service = server.services.clients
    proxy = _UpdateLandsFirst(service._store, server, reg["client_id"], changed)
    monkeypatch.setattr(service, "_store", proxy)

    disabled = await service.set_status(reg["client_id"], ClientStatus.DISABLED)

    after = await stored(server, reg["client_id"])
    assert after is not None
    assert after.status is ClientStatus.DISABLED
    assert after.metadata["client_name"] == "committed meanwhile"
    assert disabled == after
