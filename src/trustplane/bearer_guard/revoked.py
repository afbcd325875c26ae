"""The revocation list in memory: every revoked access token that has not expired yet, by ``jti``.

The bearer guard asks it on every request, the AuthZEN evaluation hot path included, so the answer is
a dictionary lookup, never a database round trip. It stays right by explicit invalidation, like the
client registry and the key ring:

- a revocation made through this object (it is the process's one
  :class:`~trustplane.protocol.revocations.RevocationStore`: ``POST /revoke``, a reused authorization
  code or refresh token) is in the list before the revoking transaction commits, so this process
  refuses the token at once;
- every revocation, by any writer in any process, bumps the ``revocations`` cache generation in its
  own transaction (``SqlRevocationStore.revoke``); each process polls the generations every
  ``cache_refresh_interval`` seconds and reloads the list when it moved (``Services.refresh_caches``).

The list is loaded on first use, so a guard never answers from a list it has not read. It holds only
unexpired revocations (rows past ``expires_at`` are dropped at each load and prune), which bounds its
size by the revocations of one access-token lifetime.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.protocol.revocations import SqlRevocationStore, revoked_tokens
from trustplane.storage.db import Database

#: Called in the revoking transaction for every new revocation: (conn, jti, client_id, expires_at).
RevocationObserver = Callable[[AsyncConnection, str, str, int], Awaitable[None]]


class RevokedTokens(SqlRevocationStore):
    """The SQL revocation store (what introspection and the grants write and read), plus the
    in-memory list of unexpired revoked ``jti`` values that the bearer guard reads."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._listed: dict[
            str, int
        ] = {}  # jti -> expires_at, as last loaded plus local revocations
        self._local: dict[
            str, int
        ] = {}  # revoked by this process (kept across reloads until expiry)
        self._loaded = False
        #: the shared-signals transmitter (trustplane.ssf) writes its SETs here, in the same
        #: transaction as the revocation, so a committed revocation always has its events
        self.observers: list[RevocationObserver] = []

    async def revoke(
        self, conn: AsyncConnection, jti: str, client_id: str, expires_at: int
    ) -> bool:
        """RFC 7009: revoke in the caller's transaction and list it here at once. Listing before the
        commit fails closed: if the transaction rolls back, this process refuses a token its client
        asked to revoke anyway, until the next reload."""
        fresh = await super().revoke(conn, jti, client_id, expires_at)
        self._local[jti] = expires_at
        self._listed[jti] = expires_at
        if fresh:
            for observer in self.observers:
                await observer(conn, jti, client_id, expires_at)
        return fresh

    async def listed(self, jti: str) -> bool:
        """Whether ``jti`` is revoked, from memory (the list is read from the database on first use)."""
        if not self._loaded:
            await self.load()
        return jti in self._listed

    def __contains__(self, jti: object) -> bool:
        """The hot path's check once :attr:`loaded` (no coroutine for a dictionary lookup)."""
        return jti in self._listed

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def load(self) -> None:
        """(Re)read every unexpired revocation; called on first use and when the generation moved."""
        now = int(time.time())
        async with self._db.read() as conn:
            rows = await conn.execute(
                select(revoked_tokens.c.jti, revoked_tokens.c.expires_at).where(
                    revoked_tokens.c.expires_at >= now
                )
            )
            fresh = {str(jti): int(exp) for jti, exp in rows}
        self._local = {jti: exp for jti, exp in self._local.items() if exp >= now}
        fresh.update(self._local)  # a local revocation whose commit the read did not see yet
        self._listed, self._loaded = fresh, True

    def __len__(self) -> int:
        return len(self._listed)
