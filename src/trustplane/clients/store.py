"""Client storage. Stores never commit; the caller's unit of work does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import orjson
from sqlalchemy import ColumnElement, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.clients.model import Client, ClientStatus
from trustplane.clients.tables import clients, initial_access_tokens


class ClientStore(Protocol):
    async def get(self, conn: AsyncConnection, client_id: str) -> Client | None:
        """The client, whatever its status; None if unknown."""

    async def list(self, conn: AsyncConnection) -> list[Client]:
        """Every client, ordered by client_id."""

    async def add(self, conn: AsyncConnection, client: Client) -> None:
        """Insert; the client_id must be new."""

    async def replace(self, conn: AsyncConnection, client: Client) -> bool:
        """Overwrite metadata/status/hashes of an existing client; False if it does not exist."""

    async def set_status(
        self, conn: AsyncConnection, client_id: str, status: ClientStatus, updated_at: int
    ) -> bool:
        """Write the status alone (the operator's enable/disable); False if the client is unknown."""

    async def replace_metadata(
        self,
        conn: AsyncConnection,
        client_id: str,
        metadata: dict[str, object],
        updated_at: int,
        *,
        registration_token_hash: str,
    ) -> bool:
        """RFC 7592 §2.2 in one conditional statement: overwrite the metadata of the client only
        while it is active and holds this registration access token hash; status and credential
        hashes are not written, so an operator's concurrent disable is never undone. False
        (nothing written) if the client is unknown, deleted, disabled or holds another token."""

    async def delete(
        self, conn: AsyncConnection, client_id: str, *, registration_token_hash: str | None = None
    ) -> bool:
        """Remove; False if it did not exist. With ``registration_token_hash`` (RFC 7592 §2.3),
        only an active client holding that token hash is removed."""


def _from_row(row: dict[str, object]) -> Client:
    return Client.build(
        str(row["client_id"]),
        orjson.loads(str(row["metadata"])),
        ClientStatus(str(row["status"])),
        secret_hash=row["secret_hash"],
        registration_token_hash=row["registration_token_hash"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _values(client: Client) -> dict[str, object]:
    return {
        "metadata": orjson.dumps(client.metadata).decode(),
        "status": client.status.value,
        "secret_hash": client.secret_hash,
        "registration_token_hash": client.registration_token_hash,
        "updated_at": client.updated_at,
    }


class SqlClientStore:
    async def get(self, conn: AsyncConnection, client_id: str) -> Client | None:
        row = (
            (await conn.execute(select(clients).where(clients.c.client_id == client_id)))
            .mappings()
            .first()
        )
        return _from_row(dict(row)) if row else None

    async def list(self, conn: AsyncConnection) -> list[Client]:
        rows = (await conn.execute(select(clients).order_by(clients.c.client_id))).mappings().all()
        return [_from_row(dict(r)) for r in rows]

    async def add(self, conn: AsyncConnection, client: Client) -> None:
        await conn.execute(
            insert(clients).values(
                client_id=client.client_id, created_at=client.created_at, **_values(client)
            )
        )

    async def replace(self, conn: AsyncConnection, client: Client) -> bool:
        result = await conn.execute(
            update(clients).where(clients.c.client_id == client.client_id).values(**_values(client))
        )
        return bool(result.rowcount == 1)

    async def set_status(
        self, conn: AsyncConnection, client_id: str, status: ClientStatus, updated_at: int
    ) -> bool:
        result = await conn.execute(
            update(clients)
            .where(clients.c.client_id == client_id)
            .values(status=status.value, updated_at=updated_at)
        )
        return bool(result.rowcount == 1)

    async def replace_metadata(
        self,
        conn: AsyncConnection,
        client_id: str,
        metadata: dict[str, object],
        updated_at: int,
        *,
        registration_token_hash: str,
    ) -> bool:
        c = clients.c
        result = await conn.execute(
            update(clients)
            .where(
                c.client_id == client_id,
                c.registration_token_hash == registration_token_hash,
                c.status == ClientStatus.ACTIVE.value,
            )
            .values(metadata=orjson.dumps(metadata).decode(), updated_at=updated_at)
        )
        return bool(result.rowcount == 1)

    async def delete(
        self, conn: AsyncConnection, client_id: str, *, registration_token_hash: str | None = None
    ) -> bool:
        c = clients.c
        statement = delete(clients).where(c.client_id == client_id)
        if registration_token_hash is not None:
            statement = statement.where(
                c.registration_token_hash == registration_token_hash,
                c.status == ClientStatus.ACTIVE.value,
            )
        result = await conn.execute(statement)
        return bool(result.rowcount == 1)


def _usable(token_hash: str, now: int) -> tuple[ColumnElement[bool], ...]:
    """Known, not revoked, not expired, not used up, and bound to an LEI or unbound by the
    operator's choice (a token with neither was created unbound by default before migration 0025:
    it registers nothing)."""
    t = initial_access_tokens.c
    return (
        t.token_hash == token_hash,
        t.revoked_at.is_(None),
        t.expires_at > now,
        t.max_uses.is_(None) | (t.uses < t.max_uses),
        t.lei.is_not(None) | t.any_lei,
    )


#: Hex digits of a token's SHA-256 hash that name it to the operator (``registration-token list``
#: and ``revoke``): 64 bits, never the token itself, and nothing an attacker could use to register.
TOKEN_ID_LENGTH = 16


def token_id(token_hash: str) -> str:
    """The operator's name for a stored initial access token: its hash's first 16 hex digits."""
    return token_hash[:TOKEN_ID_LENGTH]


@dataclass(frozen=True, slots=True)
class InitialAccessTokenInfo:
    """A stored initial access token as the operator sees it (``registration-token list``)."""

    id: str
    description: str
    created_at: int
    expires_at: int
    max_uses: int | None
    uses: int
    lei: str | None
    any_lei: bool
    revoked_at: int | None

    def state(self, now: int) -> str:
        """``active``, or why it registers nothing: ``revoked``, ``expired``, ``used up``, or
        ``unbound`` (created unbound by default before migration 0025)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "used up"
        if self.lei is None and not self.any_lei:
            return "unbound"
        return "active"


@dataclass(frozen=True, slots=True)
class UsableToken:
    """An initial access token that may register a client now."""

    #: The legal entity whose clients it registers; None: any (the operator's explicit choice).
    lei: str | None


class SqlInitialAccessTokenStore:
    """Initial access tokens for RFC 7591 registration: hashed, expiring, optionally limited uses,
    bound to one legal entity unless the operator asked for an unbound one."""

    async def add(
        self,
        conn: AsyncConnection,
        token_hash: str,
        description: str,
        now: int,
        expires_at: int,
        max_uses: int | None,
        *,
        lei: str | None,
    ) -> None:
        """``lei``: the one legal entity whose clients the token registers; None: any (the
        operator asked for an unbound token explicitly; the service checks that)."""
        await conn.execute(
            insert(initial_access_tokens).values(
                token_hash=token_hash,
                description=description,
                created_at=now,
                expires_at=expires_at,
                max_uses=max_uses,
                uses=0,
                lei=lei,
                any_lei=lei is None,
            )
        )

    async def usable(self, conn: AsyncConnection, token_hash: str, now: int) -> UsableToken | None:
        """Read-only check: known, not expired, not used up, bound to an LEI or explicitly unbound
        (``use`` is still the atomic gate)."""
        row = await conn.execute(
            select(initial_access_tokens.c.lei).where(*_usable(token_hash, now))
        )
        found = row.first()
        return None if found is None else UsableToken(found.lei)

    async def all(self, conn: AsyncConnection) -> list[InitialAccessTokenInfo]:
        """Every stored token, newest first (the hashes shortened to their ids)."""
        t = initial_access_tokens.c
        rows = await conn.execute(
            select(
                t.token_hash, t.description, t.created_at, t.expires_at, t.max_uses, t.uses,
                t.lei, t.any_lei, t.revoked_at,
            ).order_by(t.created_at.desc(), t.token_hash)
        )  # fmt: skip
        return [
            InitialAccessTokenInfo(
                token_id(r.token_hash),
                r.description,
                r.created_at,
                r.expires_at,
                r.max_uses,
                r.uses,
                r.lei,
                bool(r.any_lei),
                r.revoked_at,
            )
            for r in rows
        ]

    async def revoke(
        self, conn: AsyncConnection, id_: str, now: int
    ) -> InitialAccessTokenInfo | None:
        """Revoke the one token whose id is ``id_`` (16 lowercase hex digits; the caller checks the
        form) and that is not revoked yet; the token as it was, or None (no such token, or already
        revoked: nothing written)."""
        t = initial_access_tokens.c
        found = [info for info in await self.all(conn) if info.id == id_]
        if len(found) != 1 or found[0].revoked_at is not None:
            return None
        result = await conn.execute(
            update(initial_access_tokens)
            .where(t.token_hash.startswith(id_, autoescape=True), t.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return found[0] if result.rowcount == 1 else None

    async def use(self, conn: AsyncConnection, token_hash: str, now: int) -> bool:
        """Count one use atomically; False if ``usable`` would say None (nothing written)."""
        t = initial_access_tokens.c
        result = await conn.execute(
            update(initial_access_tokens).where(*_usable(token_hash, now)).values(uses=t.uses + 1)
        )
        return bool(result.rowcount == 1)
