"""Signing-key lifecycle and the in-memory key ring used on the hot path.

Lifecycle (each step an audit event):
``next``    published in the JWKS so that relying parties cache it before it signs anything;
``active``  signs every new token (exactly one);
``retired`` no longer signs, still published until every token it signed has expired
            (retired_at + the hard maximum token lifetime + clock skew);
``removed`` gone from the JWKS; its private key is erased.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.jose.jwk import PublicKey, import_public_jwk, thumbprint
from trustplane.jose.jws import Signer
from trustplane.keys.crypto import (
    decrypt_private_key,
    encrypt_private_key,
    generate_private_key,
    public_jwk,
)
from trustplane.keys.store import KeyState, KeyStore, StoredKey
from trustplane.settings import MAX_ACCESS_TOKEN_LIFETIME, Settings
from trustplane.storage import generations
from trustplane.storage.db import Database

log = structlog.get_logger("trustplane.keys")
GENERATION = "keys"
AuditWriter = Callable[[AsyncConnection, list[AuditEvent]], Awaitable[object]]


class _NotDue(Exception):
    """Raised inside the rotation transaction to roll it back when another process rotated first."""


class NoActiveKeyError(Exception):
    """The key ring has no active key: run ``trustplane migrate`` / ``serve`` to create one."""


@dataclass(frozen=True)
class KeyRing:
    """Immutable snapshot: swapping the whole object is the only way keys change in memory."""

    signer: Signer | None
    verify_keys: dict[str, tuple[str, PublicKey]] = field(default_factory=dict)
    jwks_json: bytes = b'{"keys":[]}'
    keys: tuple[StoredKey, ...] = ()

    def require_signer(self) -> Signer:
        if self.signer is None:
            raise NoActiveKeyError("no active signing key")
        return self.signer


class KeyService:
    def __init__(
        self,
        db: Database,
        store: KeyStore,
        settings: Settings,
        kek: bytes,
        audit_writer: AuditWriter,
    ) -> None:
        self._db, self._store, self._settings, self._kek = db, store, settings, kek
        self._audit = audit_writer
        self.ring = KeyRing(signer=None)

    async def load(self) -> KeyRing:
        """Rebuild the in-memory ring from the database (decrypting only the active key)."""
        async with self._db.read() as conn:
            keys = await self._store.list(conn)
        signer = None
        verify: dict[str, tuple[str, PublicKey]] = {}
        for key in keys:
            verify[key.kid] = import_public_jwk(key.public_jwk)
            if key.state is KeyState.ACTIVE and key.private_key is not None:
                private = decrypt_private_key(key.private_key, self._kek, key.kid)
                signer = Signer(private, key.alg, key.kid, typ="at+jwt")
        jwks = {"keys": [_published(k) for k in keys]}
        self.ring = KeyRing(signer, verify, orjson.dumps(jwks), tuple(keys))
        return self.ring

    async def ensure(self) -> bool:
        """First start: create an active and a next key if there is no active key. True if created."""
        now = int(time.time())
        async with self._db.transaction() as conn:
            await generations.bump(conn, GENERATION)  # also serialises concurrent starters
            keys = await self._store.list(conn)
            if any(k.state is KeyState.ACTIVE for k in keys):
                return False
            events = [await self._create(conn, KeyState.ACTIVE, now)]
            if not any(k.state is KeyState.NEXT for k in keys):
                events.append(await self._create(conn, KeyState.NEXT, now))
            await self._audit(conn, events)
        await self.load()
        return True

    async def rotate(self, *, reason: str = "manual") -> str:
        """next -> active, active -> retired, new next. Returns the newly active kid."""
        now = int(time.time())
        async with self._db.transaction() as conn:
            await generations.bump(conn, GENERATION)
            kid = await self._rotate_locked(conn, now, reason)
        await self.load()
        return kid

    async def maybe_rotate(self) -> str | None:
        """Scheduled rotation: rotate when the active key is older than the configured interval and
        the next key has been published for at least ``key_next_publication`` seconds. Checked on the
        in-memory ring first, so the common case (not due) writes nothing."""
        now = int(time.time())
        if not self._rotation_due(self.ring.keys, now):
            return None
        try:
            async with self._db.transaction() as conn:
                await generations.bump(
                    conn, GENERATION
                )  # lock, then re-check: another process won?
                if not self._rotation_due(tuple(await self._store.list(conn)), now):
                    raise _NotDue
                kid: str | None = await self._rotate_locked(conn, now, "schedule")
        except _NotDue:
            kid = None
        await self.load()
        return kid

    def _rotation_due(self, keys: tuple[StoredKey, ...], now: int) -> bool:
        interval = self._settings.key_rotation_interval
        active = next((k for k in keys if k.state is KeyState.ACTIVE), None)
        nxt = next((k for k in keys if k.state is KeyState.NEXT), None)
        if interval == 0 or active is None or (active.activated_at or 0) + interval > now:
            return False
        return nxt is None or nxt.created_at + self._settings.key_next_publication <= now

    async def prune(self) -> list[str]:
        """Remove retired keys whose tokens have all expired."""
        now = int(time.time())
        removed: list[str] = []
        async with self._db.transaction() as conn:
            keys = await self._store.list(conn)
            for key in keys:
                due = key.state is KeyState.RETIRED and (key.remove_after or 0) <= now
                if due and await self._store.transition(
                    conn, key.kid, KeyState.RETIRED, KeyState.REMOVED, now
                ):
                    removed.append(key.kid)
            if removed:
                await generations.bump(conn, GENERATION)
                await self._audit(
                    conn, [self._event(AuditEventType.KEY_REMOVED, k) for k in removed]
                )
        if removed:
            await self.load()
        return removed

    async def list_all(self) -> list[StoredKey]:
        async with self._db.read() as conn:
            return await self._store.list(conn, include_removed=True)

    async def _rotate_locked(self, conn: AsyncConnection, now: int, reason: str) -> str:
        keys = await self._store.list(conn)
        active = next((k for k in keys if k.state is KeyState.ACTIVE), None)
        nxt = next((k for k in keys if k.state is KeyState.NEXT), None)
        events: list[AuditEvent] = []
        if nxt is None:  # nothing was pre-published: create one now (emergency rotation)
            events.append(await self._create(conn, KeyState.NEXT, now))
            nxt_kid = str(events[-1].payload["kid"])
        else:
            nxt_kid = nxt.kid
        if active is not None:
            remove_after = now + MAX_ACCESS_TOKEN_LIFETIME + self._settings.clock_skew
            ok = await self._store.transition(
                conn, active.kid, KeyState.ACTIVE, KeyState.RETIRED, now, remove_after=remove_after
            )
            if not ok:
                raise RuntimeError("concurrent rotation detected")
            events.append(self._event(AuditEventType.KEY_RETIRED, active.kid, reason=reason))
        if not await self._store.transition(conn, nxt_kid, KeyState.NEXT, KeyState.ACTIVE, now):
            raise RuntimeError("concurrent rotation detected")
        events.append(self._event(AuditEventType.KEY_ACTIVATED, nxt_kid, reason=reason))
        events.append(await self._create(conn, KeyState.NEXT, now))
        await self._audit(conn, events)
        log.info("signing_key_rotated", active=nxt_kid, reason=reason)
        return nxt_kid

    async def _create(self, conn: AsyncConnection, state: KeyState, now: int) -> AuditEvent:
        alg = self._settings.signing_algorithm
        private = generate_private_key(alg)
        jwk = public_jwk(private)
        kid = thumbprint(jwk)
        stored = StoredKey(
            kid=kid,
            alg=alg,
            state=state,
            public_jwk=jwk,
            private_key=encrypt_private_key(private, self._kek, kid),
            created_at=now,
            activated_at=now if state is KeyState.ACTIVE else None,
            retired_at=None,
            remove_after=None,
        )
        await self._store.add(conn, stored)
        return self._event(AuditEventType.KEY_CREATED, kid, state=state.value, alg=alg)

    def _event(self, type_: AuditEventType, kid: str, **payload: str) -> AuditEvent:
        return AuditEvent(
            type=type_,
            issuer=self._settings.issuer,
            service="trustplane.keys",
            payload={"kid": kid, **payload},
        )


def _published(key: StoredKey) -> dict[str, object]:
    """What the JWKS shows for one key: public members, kid, alg, use. Never private members."""
    return {**key.public_jwk, "kid": key.kid, "alg": key.alg, "use": "sig"}
