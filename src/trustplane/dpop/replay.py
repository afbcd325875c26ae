"""Single use of DPoP proof ``jti`` values (RFC 9449 §11.1), remembered only while the proof's ``iat``
would still be accepted.

The store is anything with the ``consume`` of :class:`trustplane.protocol.replay.ReplayCache`: on
trustplane, the database or Redis cache the assertion ``jti``s use. Proofs live in a namespace of
their own (``dpop-proof:<jkt>``, see :data:`REPLAY_NAMESPACE`), so a proof ``jti`` never collides
with an assertion ``jti`` (whose namespace is a client id or ``partner-assertion:<issuer>``), and one
key's proofs never collide with another's. A resource server without a database uses
:class:`MemoryJtiStore` (one process) or ``RedisReplayCache`` (several).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from trustplane.errors import TemporarilyUnavailableError

REPLAY_NAMESPACE = "dpop-proof:"


class JtiStore(Protocol):
    async def consume(self, issuer: str, jti: str, expires_at: int) -> bool:
        """True exactly once per ``(issuer, jti)`` until ``expires_at`` (Unix seconds); may raise
        ``TemporarilyUnavailableError`` when the store cannot answer (the request fails closed)."""
        ...


class MemoryJtiStore:
    """A bounded in-process store: the PEP SDK's default. Correct for one process only; a resource
    server with several processes or instances passes a shared store (``RedisReplayCache``).

    Entries are forgotten once expired. When ``max_entries`` live entries are held (more proofs inside
    one ``iat`` window than the bound), new proofs are refused 503 rather than forgetting a live
    ``jti``: forgetting would let that proof be replayed."""

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries, self._clock = max_entries, clock
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()

    async def consume(self, issuer: str, jti: str, expires_at: int) -> bool:
        now = self._clock()
        self._forget_expired(now)
        key = (issuer, jti)
        held = self._seen.get(key)
        if held is not None and held >= now:
            return False
        if held is None and len(self._seen) >= self.max_entries:
            self._forget_expired(now, everything=True)
            if len(self._seen) >= self.max_entries:
                raise TemporarilyUnavailableError(
                    "too many DPoP proofs in flight; try again shortly", debug="dpop_replay_full"
                )
        self._seen[key] = expires_at
        self._seen.move_to_end(key)
        return True

    def __len__(self) -> int:
        return len(self._seen)

    def _forget_expired(self, now: float, *, everything: bool = False) -> None:
        """Oldest first (entries arrive roughly in expiry order); ``everything`` scans the lot."""
        if everything:
            for key in [k for k, exp in self._seen.items() if exp < now]:
                del self._seen[key]
            return
        while self._seen:
            key, exp = next(iter(self._seen.items()))
            if exp >= now:
                return
            del self._seen[key]
