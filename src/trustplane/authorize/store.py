"""Authorization codes and refresh tokens: tables and stores.

Both are stored as SHA-256 hashes of 256-bit random values (a leaked table yields nothing usable),
and both are consumed with a conditional UPDATE inside the caller's transaction, so that of two
racing redemptions exactly one sees ``rowcount == 1``.

What must hold after each call (the caller owns the transaction):
- ``CodeStore.consume``: the code is marked used and records the access token's jti and the refresh
  family it produced; True only for the first caller, and only before expiry.
- ``RefreshStore.rotate``: the token is marked rotated; True only for the first caller.
- ``RefreshStore.revoke_family``: every token of the family is revoked; returns the access tokens
  (jti, exp) issued alongside them, for the caller to revoke too.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Integer,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.storage.metadata import metadata
from trustplane.storage.prune import delete_expired


def new_secret_value() -> str:
    """256 bits from the OS CSPRNG, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _grant_columns() -> list[Column[Any]]:
    return [
        Column("client_id", String(128), nullable=False),
        Column("user_id", String(32), nullable=False),
        Column("user_lei", String(20), nullable=False),
        Column("mandate_id", String(64), nullable=False),
        Column("mandate_version", Integer, nullable=False),
        Column("resource", String(512), nullable=False),
        Column("scopes", Text, nullable=False),
        Column("authorization_details", Text, nullable=False),
        Column("auth_time", BigInteger),
        Column("acr", String(64)),
    ]


authorization_codes = Table(
    "authorization_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    *_grant_columns(),
    Column("redirect_uri", Text, nullable=False),
    Column("redirect_uri_given", Boolean, nullable=False),
    Column("code_challenge", String(64)),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("used_at", BigInteger),
    Column("access_jti", String(64)),
    Column("access_exp", BigInteger),
    Column("family_id", String(64)),
    # RFC 9449 §10: the DPoP key (RFC 7638 thumbprint) the code is bound to
    Column("dpop_jkt", String(64)),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("family_id", String(64), nullable=False, index=True),
    *_grant_columns(),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
    Column("rotated_at", BigInteger),
    Column("revoked_at", BigInteger),
    Column("access_jti", String(64), nullable=False),
    Column("access_exp", BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True)
class GrantContext:
    """What a code or a refresh token stands for; every token issued from it carries this."""

    client_id: str
    user_id: str
    user_lei: str
    mandate_id: str
    mandate_version: int
    resource: str
    scopes: tuple[str, ...]
    authorization_details: tuple[dict[str, Any], ...]
    auth_time: int | None
    acr: str | None

    def columns(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "user_id": self.user_id,
            "user_lei": self.user_lei,
            "mandate_id": self.mandate_id,
            "mandate_version": self.mandate_version,
            "resource": self.resource,
            "scopes": " ".join(self.scopes),
            "authorization_details": orjson.dumps(self.authorization_details).decode(),
            "auth_time": self.auth_time,
            "acr": self.acr,
        }

    @classmethod
    def from_row(cls, row: Any) -> GrantContext:
        return cls(
            row.client_id,
            row.user_id,
            row.user_lei,
            row.mandate_id,
            row.mandate_version,
            row.resource,
            tuple(row.scopes.split()),
            tuple(orjson.loads(row.authorization_details)),
            row.auth_time,
            row.acr,
        )


def grant_event(
    type_: AuditEventType,
    grant: GrantContext,
    *,
    issuer: str,
    details_digest: str | None,
    decision: str | None,
    reason: str | None = None,
    payload: dict[str, Any],
) -> AuditEvent:
    """The audit record of something done with a grant (consent, code, token): who, for whom,
    which resource, scopes, details and mandate version. The one mapping of a grant to the envelope."""
    return AuditEvent(
        type=type_,
        issuer=issuer,
        subject=grant.user_id,
        client_id=grant.client_id,
        audience=grant.resource,
        scopes=grant.scopes,
        authorization_details_digest=details_digest,
        mandate_id=grant.mandate_id,
        mandate_version=grant.mandate_version,
        decision=decision,
        reason=reason,
        payload=payload,
    )


@dataclass(frozen=True, slots=True)
class StoredCode:
    grant: GrantContext
    redirect_uri: str
    redirect_uri_given: bool
    code_challenge: str | None
    expires_at: int
    used_at: int | None
    access_jti: str | None
    access_exp: int | None
    family_id: str | None
    #: RFC 9449 §10: redeemed only with a DPoP proof of this key (None: any or no proof).
    dpop_jkt: str | None = None


@dataclass(frozen=True, slots=True)
class StoredRefresh:
    grant: GrantContext
    family_id: str
    expires_at: int
    rotated_at: int | None
    revoked_at: int | None


@dataclass(frozen=True, slots=True)
class RevokedFamily:
    """What :meth:`RefreshStore.revoke_family` did."""

    #: Refresh tokens this call revoked (0: a concurrent or earlier revocation already had).
    revoked: int
    #: ``(jti, exp, client_id)`` of the access tokens issued alongside the family's tokens.
    access: list[tuple[str, int, str]]


class CodeStore(Protocol):
    """Authorization codes (RFC 6749 §4.1.2), by the hash of their value."""

    async def create(
        self,
        conn: AsyncConnection,
        code: str,
        grant: GrantContext,
        *,
        redirect_uri: str,
        redirect_uri_given: bool,
        code_challenge: str | None,
        expires_at: int,
        dpop_jkt: str | None = None,
    ) -> None:
        """Store a new, unused code for ``grant`` (``dpop_jkt``: RFC 9449 §10)."""

    async def get(self, conn: AsyncConnection, code: str) -> StoredCode | None:
        """The code whatever its state (used, expired), so that a replay can be recognised;
        None if unknown."""

    async def consume(
        self,
        conn: AsyncConnection,
        code: str,
        now: int,
        *,
        access_jti: str | None,
        access_exp: int | None,
        family_id: str | None,
    ) -> bool:
        """Mark the code used and record what it produced (nothing: the code is spent unredeemed,
        as when another client presents it); True only for the first caller, and only before
        expiry (RFC 6749 §4.1.2: a code is used once)."""

    async def prune(self, conn: AsyncConnection, before: int) -> int:
        """Delete codes that expired before ``before``; returns how many."""


class RefreshStore(Protocol):
    """Refresh tokens (RFC 6749 §6), by the hash of their value, rotated on every use and grouped
    in families: the tokens descended from one authorization code."""

    async def create(
        self,
        conn: AsyncConnection,
        token: str,
        family_id: str,
        grant: GrantContext,
        *,
        now: int,
        expires_at: int,
        access_jti: str,
        access_exp: int,
    ) -> None:
        """Store a new token of ``family_id`` with the access token issued alongside it."""

    async def get(
        self, conn: AsyncConnection, token: str, *, lock: bool = False
    ) -> StoredRefresh | None:
        """The token whatever its state (rotated, revoked, expired); None if unknown. ``lock``:
        hold its row until the caller's transaction ends (PostgreSQL ``FOR UPDATE``), so that a
        revocation of its family waits for the caller, or the caller for the revocation."""

    async def rotate(self, conn: AsyncConnection, token: str, now: int) -> bool:
        """Mark the token rotated; True only for the first caller, and only if it is neither
        rotated nor revoked (a second use is reuse: the caller revokes the family)."""

    async def revoke_family(self, conn: AsyncConnection, family_id: str, now: int) -> RevokedFamily:
        """Revoke every token of the family, including a successor a concurrent rotation stores
        meanwhile; returns how many this call revoked and the access tokens issued alongside them,
        for the caller to revoke too."""

    async def prune(self, conn: AsyncConnection, before: int) -> int:
        """Delete tokens that expired before ``before``; returns how many."""


class SqlCodeStore:
    async def create(
        self,
        conn: AsyncConnection,
        code: str,
        grant: GrantContext,
        *,
        redirect_uri: str,
        redirect_uri_given: bool,
        code_challenge: str | None,
        expires_at: int,
        dpop_jkt: str | None = None,
    ) -> None:
        await conn.execute(
            insert(authorization_codes).values(
                code_hash=digest(code),
                redirect_uri=redirect_uri,
                redirect_uri_given=redirect_uri_given,
                code_challenge=code_challenge,
                expires_at=expires_at,
                dpop_jkt=dpop_jkt,
                **grant.columns(),
            )
        )

    async def get(self, conn: AsyncConnection, code: str) -> StoredCode | None:
        query = select(authorization_codes).where(authorization_codes.c.code_hash == digest(code))
        row = (await conn.execute(query)).first()
        if row is None:
            return None
        return StoredCode(
            GrantContext.from_row(row),
            row.redirect_uri,
            row.redirect_uri_given,
            row.code_challenge,
            row.expires_at,
            row.used_at,
            row.access_jti,
            row.access_exp,
            row.family_id,
            row.dpop_jkt,
        )

    async def consume(
        self,
        conn: AsyncConnection,
        code: str,
        now: int,
        *,
        access_jti: str | None,
        access_exp: int | None,
        family_id: str | None,
    ) -> bool:
        c = authorization_codes.c
        result = await conn.execute(
            update(authorization_codes)
            .where(c.code_hash == digest(code), c.used_at.is_(None), c.expires_at > now)
            .values(used_at=now, access_jti=access_jti, access_exp=access_exp, family_id=family_id)
        )
        return bool(result.rowcount == 1)

    async def prune(self, conn: AsyncConnection, before: int) -> int:
        """Delete codes that expired before ``before`` (kept a while after expiry so that a late
        replay is still recognised as reuse)."""
        return await delete_expired(
            conn, authorization_codes, authorization_codes.c.expires_at, before
        )


class SqlRefreshStore:
    async def create(
        self,
        conn: AsyncConnection,
        token: str,
        family_id: str,
        grant: GrantContext,
        *,
        now: int,
        expires_at: int,
        access_jti: str,
        access_exp: int,
    ) -> None:
        await conn.execute(
            insert(refresh_tokens).values(
                token_hash=digest(token),
                family_id=family_id,
                created_at=now,
                expires_at=expires_at,
                access_jti=access_jti,
                access_exp=access_exp,
                **grant.columns(),
            )
        )

    async def get(
        self, conn: AsyncConnection, token: str, *, lock: bool = False
    ) -> StoredRefresh | None:
        query = select(refresh_tokens).where(refresh_tokens.c.token_hash == digest(token))
        if lock:
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        if row is None:
            return None
        return StoredRefresh(
            GrantContext.from_row(row),
            row.family_id,
            row.expires_at,
            row.rotated_at,
            row.revoked_at,
        )

    async def rotate(self, conn: AsyncConnection, token: str, now: int) -> bool:
        c = refresh_tokens.c
        result = await conn.execute(
            update(refresh_tokens)
            .where(c.token_hash == digest(token), c.rotated_at.is_(None), c.revoked_at.is_(None))
            .values(rotated_at=now)
        )
        return bool(result.rowcount == 1)

    async def revoke_family(self, conn: AsyncConnection, family_id: str, now: int) -> RevokedFamily:
        c = refresh_tokens.c
        revoke = (
            update(refresh_tokens)
            .where(c.family_id == family_id, c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        # Until nothing is left to revoke: on PostgreSQL an UPDATE that waited for a concurrent
        # rotation (which locked the token it rotated) does not see the successor that rotation
        # inserted (its snapshot predates the commit), so one pass would leave that refresh token
        # alive. The next pass sees it; a pass that changes nothing waited for no one.
        revoked = 0
        while changed := (await conn.execute(revoke)).rowcount:
            revoked += changed
        rows = await conn.execute(
            select(c.access_jti, c.access_exp, c.client_id).where(c.family_id == family_id)
        )
        return RevokedFamily(revoked, [(r.access_jti, r.access_exp, r.client_id) for r in rows])

    async def prune(self, conn: AsyncConnection, before: int) -> int:
        return await delete_expired(conn, refresh_tokens, refresh_tokens.c.expires_at, before)
