"""Idempotency keys for non-idempotent operations (draft-ietf-httpapi-idempotency-key-header-07),
framework-free. See docs/pep.md, "Idempotency keys".

A client sends ``Idempotency-Key: "<unique value>"`` with a POST; a retry of the same request returns
the stored result instead of executing the operation again:

====================================================  ======  ==========================================
situation                                             status  problem ``title`` (draft §2.7)
====================================================  ======  ==========================================
first request with this key                           (handler's own)
retry, same key and payload, first one completed      stored status, ``Idempotency-Replayed: true``
no ``Idempotency-Key`` header                         400     Idempotency-Key is missing
not an RFC 8941 sf-string, empty, too long, repeated  400     Idempotency-Key is malformed
same key, another payload (fingerprint)               422     Idempotency-Key is already used
same key, the first request still in progress         409     A request is outstanding for this ...
====================================================  ======  ==========================================

Keys are scoped by the caller (operation and client), so two clients' equal keys never meet.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

import structlog

from trustplane.pep import metrics

log = structlog.get_logger("trustplane.pep")

MAX_KEY_LENGTH = 255
_MAX_FIELD_LENGTH = 2 * MAX_KEY_LENGTH + 2  # every character escaped, plus the quotes
PROBLEM_BASE = "https://trustplane.dev/problems/idempotency-key"
#: An sf-string without escapes: printable ASCII but ``"`` and ``\\`` between the quotes. Nearly
#: every key is one; anything else goes through the character walk, which names what is wrong.
_PLAIN_KEY = re.compile(r'"([\x20\x21\x23-\x5b\x5d-\x7e]*)"')


class IdempotencyError(Exception):
    """A refused request, rendered as an RFC 9457 problem (``type``, ``title``, ``status``,
    ``detail``); ``outcome`` labels the metric."""

    status: ClassVar[int]
    title: ClassVar[str]
    type_uri: ClassVar[str]
    outcome: ClassVar[str]

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def problem(self) -> dict[str, Any]:
        return {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }


class MissingKeyError(IdempotencyError):
    """Draft §2.7: the operation requires the header and the request has none (400)."""

    status, outcome = 400, "missing"
    title = "Idempotency-Key is missing"
    type_uri = f"{PROBLEM_BASE}/missing"


class MalformedKeyError(IdempotencyError):
    """Draft §2.1: the value MUST be an RFC 8941 String, in one field line (400)."""

    status, outcome = 400, "malformed"
    title = "Idempotency-Key is malformed"
    type_uri = f"{PROBLEM_BASE}/malformed"


class KeyReusedError(IdempotencyError):
    """Draft §2.2/§2.7: a key MUST NOT be reused with a different request payload (422)."""

    status, outcome = 422, "mismatch"
    title = "Idempotency-Key is already used"
    type_uri = f"{PROBLEM_BASE}/already-used"


class RequestOutstandingError(IdempotencyError):
    """Draft §2.6/§2.7: a retry while the original request is still being processed (409)."""

    status, outcome = 409, "in_progress"
    title = "A request is outstanding for this Idempotency-Key"
    type_uri = f"{PROBLEM_BASE}/outstanding"


def parse_key(field_value: str) -> str:
    """The key in an ``Idempotency-Key`` field value: an RFC 8941 §3.3.3 sf-string, parsed per
    §4.2.5 (printable ASCII, ``\\"`` and ``\\\\`` the only escapes). Surrounding spaces are
    discarded (§4.2); parameters and anything else after the closing quote are refused."""
    value = field_value.strip(" ")
    if len(value) > _MAX_FIELD_LENGTH:
        raise MalformedKeyError(f"the key is longer than {MAX_KEY_LENGTH} characters")
    plain = _PLAIN_KEY.fullmatch(value)
    if plain is not None:
        return _checked(plain.group(1))
    if not value.startswith('"'):
        raise MalformedKeyError('the key must be a quoted string, e.g. Idempotency-Key: "8e03978e"')
    chars: list[str] = []
    escaped = False
    for position, char in enumerate(value[1:], start=1):
        if not " " <= char <= "~":
            raise MalformedKeyError("the key may contain printable ASCII characters only")
        if escaped:
            if char not in '"\\':
                raise MalformedKeyError('only \\" and \\\\ may be escaped in the key')
            chars.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            if position != len(value) - 1:
                raise MalformedKeyError("unexpected characters after the closing quote")
            return _checked("".join(chars))
        else:
            chars.append(char)
    raise MalformedKeyError("the closing quote is missing")


def _checked(key: str) -> str:
    if not key:
        raise MalformedKeyError("the key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise MalformedKeyError(f"the key is longer than {MAX_KEY_LENGTH} characters")
    return key


def serialize_key(key: str) -> str:
    """The field value carrying ``key`` (RFC 8941 §4.1.6), for clients and tests."""
    if not 0 < len(key) <= MAX_KEY_LENGTH or not all(" " <= char <= "~" for char in key):
        raise ValueError(f"a key is 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fingerprint(method: str, path: str, body: bytes) -> str:
    """The request's fingerprint (draft §2.4): SHA-256 over the method, the path and the raw body
    bytes; method and path are length-prefixed so that no two requests share an encoding."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode("utf-8", "surrogatepass")):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(body)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """What a replay returns: the first response's status, body and content type (and Location)."""

    status: int
    body: bytes
    content_type: str | None = None
    location: str | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """An in-progress claim on (scope, key); ``token`` tells this claimer apart from a later one
    that took over after the lease ended."""

    scope: str
    key: str
    fingerprint: str
    token: str


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A stored key: in progress while ``response`` is None. Times are Unix seconds."""

    fingerprint: str
    lease_until: float
    expires_at: float
    response: StoredResponse | None


@dataclass(slots=True)
class InTransaction:
    """A key the operation stores in its own database transaction instead of claiming it first:
    that transaction inserts the completed response for (scope, key) unless a live row holds the
    key, and when one does it writes nothing and the operation is not performed (the caller raises
    :class:`KeyTaken` with that row). One statement instead of claim, operation and complete; of
    concurrent requests with one key, the key's primary key lets one transaction commit. Only for
    an operation whose every effect is in that transaction, on the key store's database
    (``SqlIdempotencyStore.in_transaction_sql`` is the statement). ``stored``: set by the
    operation's store once its transaction committed the response."""

    scope: str
    key: str
    fingerprint: str
    token: str
    now: float
    expires_at: float
    stored: bool = False


class KeyTaken(Exception):
    """The operation's transaction found its key held (completed, in progress, or another
    payload's) and rolled back: ``record`` is the row that holds it."""

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__("the Idempotency-Key is held")
        self.record = record


@dataclass(frozen=True, slots=True)
class Execute:
    """The caller owns the claim: run the operation, then ``complete`` (or ``release``) it."""

    claim: Claim


@dataclass(frozen=True, slots=True)
class Replay:
    """The operation already completed for this key and payload: answer with ``response``."""

    response: StoredResponse


class IdempotencyStore(Protocol):
    """Where keys live. Each method is atomic on its own and durable when it returns: a claim must
    be visible to concurrent requests before the operation runs, so it cannot share the
    operation's transaction. A store whose read costs as much as its claim may say
    ``claims_first = True``: :meth:`IdempotencyService.begin` then tries the claim before reading
    (a new key, the common case, is one statement; a replay or a refusal one more)."""

    async def claim(
        self, claim: Claim, *, now: float, lease_until: float, expires_at: float
    ) -> bool:
        """Make ``claim`` the in-progress owner of (scope, key) and return True when there is no row,
        or the row's key expired (``expires_at <= now``, whatever its fingerprint), or the row is
        an in-progress claim with the same fingerprint whose lease ended (``lease_until <= now``:
        its worker is presumed dead). Otherwise change nothing and return False. Of concurrent
        callers for one (scope, key), at most one gets True."""
        ...

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """The row of (scope, key), expired or not; None if there is none."""
        ...

    async def complete(self, claim: Claim, response: StoredResponse) -> bool:
        """Store ``response`` on the row if ``claim`` still owns it (same token, in progress); True if
        stored. Afterwards ``get`` returns the response until the key expires."""
        ...

    async def release(self, claim: Claim) -> bool:
        """Delete the row if ``claim`` still owns it (same token, in progress); True if deleted.
        Afterwards the key is new again."""
        ...

    async def purge(self, before: float) -> int:
        """Delete every row whose key expired at or before ``before``; the number deleted."""
        ...


class InTransactionStore(IdempotencyStore, Protocol):
    """A store whose keys an operation may store in its own transaction (:class:`InTransaction`)."""

    async def put(self, pending: InTransaction, response: StoredResponse) -> bool:
        """Store ``response`` as the completed answer of ``pending``'s key, under the conditions
        of :meth:`IdempotencyStore.claim` (no row, an expired one, or an abandoned claim of the
        same payload); True if stored. For an answer the operation's transaction did not store
        (a refusal decided before it)."""
        ...


class IdempotencyService:
    """``begin`` answers from the store or claims a key; ``complete`` stores a deterministic
    outcome (2xx, 4xx) and releases anything else. ``lease``: how long an unfinished claim blocks
    retries; ``retention``: how long a key is kept (seconds)."""

    def __init__(
        self,
        store: IdempotencyStore,
        *,
        lease: float = 60.0,
        retention: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < lease < retention:
            raise ValueError("need 0 < lease < retention")
        self.store, self.lease, self.retention, self._clock = store, lease, retention, clock

    async def begin(
        self, scope: str, header_values: Sequence[str], fingerprint: str
    ) -> Execute | Replay:
        """Claim the key in ``header_values`` (the request's ``Idempotency-Key`` field lines) for
        ``scope`` or replay its stored response; raise an :class:`IdempotencyError` otherwise."""
        key = self._key(scope, header_values)
        claim = Claim(scope, key, fingerprint, secrets.token_urlsafe(18))
        if getattr(self.store, "claims_first", False) and await self._claim(claim):
            return Execute(claim)
        # Read first: a replay or a refusal is one read and no write. The claim itself stays an
        # atomic statement; losing it to a concurrent claimer means reading again.
        for _attempt in range(3):
            now = self._clock()
            record = await self.store.get(scope, key)
            if record is not None and not _claimable(record, fingerprint, now):
                return self._answer(claim, record)
            if await self._claim(claim, now):
                return Execute(claim)
        raise self._refuse(RequestOutstandingError("the key is changing hands, retry"), scope, key)

    async def _claim(self, claim: Claim, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        lease_until, expires_at = now + self.lease, now + self.retention
        if await self.store.claim(claim, now=now, lease_until=lease_until, expires_at=expires_at):
            metrics.IDEMPOTENCY_EXECUTED.inc()
            return True
        return False

    async def complete(self, claim: Claim, response: StoredResponse) -> bool:
        """Store a 2xx or 4xx response for replays; release the claim on anything else. True if
        stored."""
        if response.status // 100 not in (2, 4):
            await self.release(claim)
            return False
        stored = await self.store.complete(claim, response)
        if not stored:
            log.warning("pep_idempotency_claim_lost", scope=claim.scope, key=claim.key)
        return stored

    def in_transaction(
        self, scope: str, header_values: Sequence[str], fingerprint: str
    ) -> InTransaction:
        """The key in ``header_values`` for an operation that stores it in its own transaction
        (:class:`InTransaction`); raise an :class:`IdempotencyError` for a missing or malformed
        key. No statement: the store is asked only by the operation's transaction."""
        key, now, token = self._key(scope, header_values), self._clock(), secrets.token_urlsafe(18)
        return InTransaction(scope, key, fingerprint, token, now, now + self.retention)

    def answer_taken(self, pending: InTransaction, record: IdempotencyRecord) -> Replay:
        """What a request whose key is held by ``record`` gets: the stored response (same payload,
        completed), or an :class:`IdempotencyError` raised (another payload: 422; in progress:
        409)."""
        claim = Claim(pending.scope, pending.key, pending.fingerprint, "")
        return self._answer(claim, record)

    async def settle(self, pending: InTransaction, response: StoredResponse) -> Replay | None:
        """After the operation: None if its transaction stored ``pending``. Otherwise (it refused,
        or wrote nothing) store a 2xx or 4xx ``response`` on its own: None when stored (or not
        storable: 5xx), else the answer of the row that holds the key (:meth:`answer_taken`)."""
        if pending.stored:
            metrics.IDEMPOTENCY_EXECUTED.inc()
            return None
        if response.status // 100 not in (2, 4):
            return None
        store = cast(InTransactionStore, self.store)
        if await store.put(pending, response):
            metrics.IDEMPOTENCY_EXECUTED.inc()
            return None
        for _attempt in range(3):
            record = await self.store.get(pending.scope, pending.key)
            if record is not None:
                return self.answer_taken(pending, record)
            if await store.put(pending, response):  # the holder was released meanwhile
                metrics.IDEMPOTENCY_EXECUTED.inc()
                return None
        raise self._refuse(
            RequestOutstandingError("the key is changing hands, retry"), pending.scope, pending.key
        )

    async def release(self, claim: Claim) -> None:
        """Forget an unfinished claim (the operation failed): a retry executes again."""
        await self.store.release(claim)
        metrics.IDEMPOTENCY_RELEASED.inc()

    async def purge(self) -> int:
        """Delete the keys whose retention ended."""
        return await self.store.purge(self._clock())

    def _key(self, scope: str, header_values: Sequence[str]) -> str:
        if not header_values:
            raise self._refuse(
                MissingKeyError("this operation requires an Idempotency-Key header"), scope
            )
        if len(header_values) > 1:
            raise self._refuse(MalformedKeyError("more than one Idempotency-Key header"), scope)
        try:
            return parse_key(header_values[0])
        except MalformedKeyError as exc:
            raise self._refuse(exc, scope) from None

    def _answer(self, claim: Claim, record: IdempotencyRecord) -> Replay:
        if not hmac.compare_digest(record.fingerprint, claim.fingerprint):
            detail = (
                "the key was used with another request payload; use a new key for a new request"
            )
            raise self._refuse(KeyReusedError(detail), claim.scope, claim.key)
        if record.response is None:
            detail = "a request with this key is being processed; retry later"
            raise self._refuse(RequestOutstandingError(detail), claim.scope, claim.key)
        metrics.IDEMPOTENCY_REPLAYED.inc()
        return Replay(record.response)

    @staticmethod
    def _refuse(exc: IdempotencyError, scope: str, key: str | None = None) -> IdempotencyError:
        """Count and log (one line per refusal) before the caller raises it."""
        metrics.PEP_IDEMPOTENCY.labels(outcome=exc.outcome).inc()
        log.info(
            "pep_idempotency_refused", outcome=exc.outcome, scope=scope, key=key, detail=exc.detail
        )
        return exc


def _claimable(record: IdempotencyRecord, fingerprint: str, now: float) -> bool:
    """Whether ``IdempotencyStore.claim`` would take this row over: its key expired, or it is an
    abandoned claim of the same payload whose lease ended."""
    if record.expires_at <= now:
        return True
    return (
        record.response is None and record.lease_until <= now and record.fingerprint == fingerprint
    )
