"""Pushed authorization requests (RFC 9126): the table, its store, and the ``request_uri`` lifecycle.

``POST /par`` (:mod:`trustplane.authorize.http`) authenticates the client like the token endpoint,
validates the whole authorization request exactly as ``/authorize`` would (client, registered
``redirect_uri``, ``response_type``, PKCE, scopes, resource, ``authorization_details``; a request
object when one is sent), and stores the validated request here under a fresh handle. The client
gets ``urn:ietf:params:oauth:request_uri:<handle>`` and ``expires_in`` (``par_lifetime``, 60 s by
default, never over 600 s).

What must hold:
- the handle is 256 bits from the OS CSPRNG and only its SHA-256 is stored (a leaked table yields no
  usable ``request_uri``);
- ``consume`` is one conditional UPDATE (unused, unexpired, this client) inside the caller's
  transaction: of two racing uses exactly one sees ``rowcount == 1``; a use by another client
  consumes nothing;
- a ``request_uri`` that does not start with our URN prefix is refused, never fetched.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Protocol

import orjson
from sqlalchemy import BigInteger, Column, String, Table, Text, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.authorize.request import AuthorizationRequest
from trustplane.authorize.store import digest, new_secret_value
from trustplane.errors import OAuth2Error
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.storage.metadata import metadata
from trustplane.storage.prune import delete_expired

#: RFC 9126 §2.2: the ``request_uri`` is a URN of this form (the handle is ours, base64url).
REQUEST_URI_PREFIX = "urn:ietf:params:oauth:request_uri:"
_HANDLE = re.compile(r"[A-Za-z0-9_-]{43}")  # fullmatch: ``$`` lets a trailing newline through

pushed_authorization_requests = Table(
    "pushed_authorization_requests",
    metadata,
    Column("handle_hash", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("request", Text, nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("used_at", BigInteger),
)


class InvalidRequestUriError(OAuth2Error):
    """RFC 9101 §6.2: the ``request_uri`` is unknown, expired, used, or not this client's."""

    error = "invalid_request_uri"


@dataclass(frozen=True, slots=True)
class StoredPush:
    client_id: str
    request: str
    expires_at: int
    used_at: int | None


class PushedRequestStore(Protocol):
    """Where pushed requests live; the caller owns the transaction (see the module docstring)."""

    async def add(
        self, conn: AsyncConnection, handle: str, client_id: str, request: str, expires_at: int
    ) -> None: ...

    async def get(self, conn: AsyncConnection, handle: str) -> StoredPush | None: ...

    async def consume(
        self, conn: AsyncConnection, handle: str, client_id: str, now: int
    ) -> bool: ...

    async def prune(self, conn: AsyncConnection, before: int) -> int: ...


class SqlPushedRequestStore:
    async def add(
        self, conn: AsyncConnection, handle: str, client_id: str, request: str, expires_at: int
    ) -> None:
        await conn.execute(
            insert(pushed_authorization_requests).values(
                handle_hash=digest(handle),
                client_id=client_id,
                request=request,
                expires_at=expires_at,
            )
        )

    async def get(self, conn: AsyncConnection, handle: str) -> StoredPush | None:
        t = pushed_authorization_requests
        row = (await conn.execute(select(t).where(t.c.handle_hash == digest(handle)))).first()
        if row is None:
            return None
        return StoredPush(row.client_id, row.request, row.expires_at, row.used_at)

    async def consume(self, conn: AsyncConnection, handle: str, client_id: str, now: int) -> bool:
        c = pushed_authorization_requests.c
        result = await conn.execute(
            update(pushed_authorization_requests)
            .where(
                c.handle_hash == digest(handle),
                c.client_id == client_id,
                c.used_at.is_(None),
                c.expires_at > now,
            )
            .values(used_at=now)
        )
        return bool(result.rowcount == 1)

    async def prune(self, conn: AsyncConnection, before: int) -> int:
        t = pushed_authorization_requests
        return await delete_expired(conn, t, t.c.expires_at, before)


class PushedRequests:
    """Issue and redeem ``request_uri`` values (RFC 9126 §2.2, §4)."""

    def __init__(self, settings: Settings, db: Database, store: PushedRequestStore) -> None:
        self._settings, self._db, self._store = settings, db, store

    def required(self, client_metadata: dict[str, object]) -> bool:
        """RFC 9126 §5/§6: the deployment's or the client's ``require_pushed_authorization_requests``."""
        return self._settings.require_pushed_authorization_requests or bool(
            client_metadata.get("require_pushed_authorization_requests")
        )

    async def push(self, request: AuthorizationRequest) -> tuple[str, int]:
        """Store a validated request; return its ``request_uri`` and ``expires_in``."""
        handle = new_secret_value()
        lifetime = self._settings.par_lifetime
        body = orjson.dumps(request.to_dict()).decode()
        async with self._db.transaction() as conn:
            await self._store.add(
                conn, handle, request.client_id, body, int(time.time()) + lifetime
            )
        return REQUEST_URI_PREFIX + handle, lifetime

    async def redeem(self, request_uri: str, client_id: str) -> AuthorizationRequest:
        """The pushed request, consumed; :class:`InvalidRequestUriError` saying why not."""
        handle = request_uri.removeprefix(REQUEST_URI_PREFIX)
        if handle == request_uri or not _HANDLE.fullmatch(handle):
            raise InvalidRequestUriError(
                "request_uri was not issued by this server (only pushed authorization requests "
                "are accepted; nothing is fetched)",
                debug=f"foreign request_uri {request_uri[:100]!r}",
            )
        now = int(time.time())
        async with self._db.transaction() as conn:
            if await self._store.consume(conn, handle, client_id, now):
                stored = await self._store.get(conn, handle)
                assert stored is not None
                return AuthorizationRequest.from_dict(orjson.loads(stored.request))
            stored = await self._store.get(conn, handle)
        if stored is None:
            raise InvalidRequestUriError("request_uri is unknown")
        if stored.client_id != client_id:
            raise InvalidRequestUriError(
                "request_uri was issued to another client",
                debug=f"issued to {stored.client_id}, used by {client_id[:128]}",
            )
        if stored.used_at is not None:
            raise InvalidRequestUriError("request_uri was already used")
        raise InvalidRequestUriError("request_uri has expired")
