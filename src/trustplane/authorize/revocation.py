"""Ending what a delegated grant issued (RFC 6749 §4.1.2, RFC 9700 §4.14.2, RFC 7009 §2.1): a
refresh family and the access tokens issued from it, on reuse of a code or a refresh token and on a
client's revocation request, each with its audit event in the same transaction."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.sink import write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.authorize.store import GrantContext, RefreshStore, StoredCode, grant_event
from trustplane.errors import UnauthorizedClientError
from trustplane.protocol.revocations import RevocationStore
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage.db import Database


class DelegatedRevocations:
    """Ending what a delegated grant issued: a refresh family and the access tokens issued from it,
    on reuse (of a code or a refresh token) and on an RFC 7009 request; each with its audit event.
    Also the introspection service's ``RefreshRevoker``."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        refresh: RefreshStore,
        revocations: RevocationStore,
        details: AuthorizationDetailsRegistry,
    ) -> None:
        self._issuer, self._db, self._details = settings.issuer, db, details
        self.refresh, self._revocations = refresh, revocations

    async def code_reused(self, stored: StoredCode) -> None:
        """Revoke what the first redemption issued: its access token and its refresh family."""
        now = int(time.time())
        async with self._db.transaction() as conn:
            revoked = []
            if stored.access_jti is not None and stored.access_exp is not None:
                await self._revocations.revoke(
                    conn, stored.access_jti, stored.grant.client_id, stored.access_exp
                )
                revoked.append(stored.access_jti)
            if stored.family_id is not None:
                revoked += await self._revoke_family(conn, stored.family_id, now)
            event = self.event(
                AuditEventType.CODE_REUSED,
                stored.grant,
                revoked_jtis=sorted(set(revoked)),
                family_id=stored.family_id,
            )
            await write_events(conn, [event])

    async def family_reused(self, family_id: str, grant: GrantContext) -> None:
        async with self._db.transaction() as conn:
            revoked = await self._revoke_family(conn, family_id, int(time.time()))
            event = self.event(
                AuditEventType.REFRESH_FAMILY_REVOKED,
                grant,
                family_id=family_id,
                reason="refresh token reuse",
                revoked_jtis=revoked,
            )
            await write_events(conn, [event])

    async def revoke(self, token: str, client_id: str) -> bool:
        """RFC 7009 §2.1 for refresh tokens: the family ends, and with it the access tokens issued
        from the same grant. False if ``token`` is not one of our refresh tokens; another client's
        is ``unauthorized_client``; an already revoked one is a successful no-op."""
        async with self._db.read() as conn:
            stored = await self.refresh.get(conn, token)
        if stored is None:
            return False
        if stored.grant.client_id != client_id:
            raise UnauthorizedClientError("a client may revoke only its own tokens")
        if stored.revoked_at is None:
            async with self._db.transaction() as conn:
                fresh, revoked = await self._end_family(conn, stored.family_id, int(time.time()))
                if not fresh:  # a concurrent revocation of the family committed first: audited
                    return True
                event = self.event(
                    AuditEventType.REFRESH_FAMILY_REVOKED,
                    stored.grant,
                    decision=None,
                    reason="revoked by the client (RFC 7009)",
                    family_id=stored.family_id,
                    revoked_jtis=revoked,
                )
                await write_events(conn, [event])
        return True

    async def _revoke_family(self, conn: AsyncConnection, family_id: str, now: int) -> list[str]:
        return (await self._end_family(conn, family_id, now))[1]

    async def _end_family(
        self, conn: AsyncConnection, family_id: str, now: int
    ) -> tuple[int, list[str]]:
        """How many refresh tokens this call revoked, and the family's access tokens' ``jti``s."""
        family = await self.refresh.revoke_family(conn, family_id, now)
        jtis = []
        for jti, exp, client_id in family.access:
            if exp > now:
                await self._revocations.revoke(conn, jti, client_id, exp)
            jtis.append(jti)
        return family.revoked, jtis

    def event(
        self,
        type_: AuditEventType,
        grant: GrantContext,
        decision: str | None = "deny",
        reason: str = "invalid_grant",
        **payload: Any,
    ) -> AuditEvent:
        return grant_event(
            type_,
            grant,
            issuer=self._issuer,
            details_digest=self._details.digest(grant.authorization_details),
            decision=decision,
            reason=reason,
            payload=payload,
        )
