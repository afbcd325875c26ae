"""The reference services' store: trades, their transitions, the transactional outbox and the
exceptions, on the service's own database (SQLite by default, PostgreSQL in production). These
tables are not part of trustplane's migrations: ``await store.create_schema()`` creates them.

Every state change is one transaction that (1) moves the trade with a compare-and-set on its state
(``UPDATE ... WHERE state = <source>``), (2) inserts the transition, which a unique constraint on
(trade_id, transition) makes happen at most once for ever, and (3) inserts the signed event into
the outbox, as its last statement (:func:`append`: commit order is the outbox's ``seq`` order,
which the hand-off's cursors rely on). Either all three are committed or none: no event without
its state change, no state change without its event. Racing duplicates: on PostgreSQL the
losers' ``UPDATE`` waits for the winner's row lock, re-reads the state and matches nothing; SQLite
has one writer. A loser is told which transition already happened (when, by whom, under which
Idempotency-Key). On PostgreSQL an owner's plain transition and the learning of an upstream event
are each one statement, a function running the same steps (:mod:`.store_pg`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from trustplane.pep.idempotency import InTransaction, KeyTaken, StoredResponse
from trustplane.pep.idempotency_store import record_of
from trustplane.reference import machine, store_pg
from trustplane.reference.events import Envelope, EventSigner
from trustplane.storage.db import Database, is_disconnect

metadata = MetaData()

#: The columns a trade's steps never change first, then those they change: PostgreSQL logs an
#: update whose new version stays on the old one's page (a HOT update: every step's) without the
#: bytes the two versions share at their start and end, so the order's envelope (~700 bytes) in
#: that prefix is not written to the WAL again by each of the 14 updates of a lifecycle over the
#: four stores; between ``state`` and ``updated_at`` it was. ``create_schema`` moves a
#: PostgreSQL store made before (:func:`_order_trades`).
trades = Table(
    "ref_trades",
    metadata,
    Column("trade_id", String(64), primary_key=True),
    Column("account", String(64), nullable=False),
    Column("instrument", String(64), nullable=False),
    Column("side", String(8), nullable=False),
    Column("quantity", String(40), nullable=False),
    Column("amount", String(40), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("txn", String(256)),
    Column("created_at", BigInteger, nullable=False),
    Column("envelope", Text, nullable=False),  # JSON: the envelope of the order
    Column("state", String(32), nullable=False),
    Column("proposer", String(256)),  # who proposed the allocation (four-eyes)
    Column("allocation", Text),  # JSON
    Column("settlement", Text),  # JSON: the submitted instructions
    Column("exceptions", Integer, nullable=False, default=0),
    Column("version", Integer, nullable=False, default=1),
    Column("updated_at", BigInteger, nullable=False),
)

transitions = Table(
    "ref_transitions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trade_id", String(64), nullable=False),
    Column("transition", String(64), nullable=False),
    Column("source", String(32)),
    Column("target", String(32), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("idempotency_key", String(255)),
    Column("event_id", String(36), nullable=False),
    Column("at", BigInteger, nullable=False),
    # the acting token (None for the CLI and for signals): what the trade rests on, so that the
    # issuer's revocation of the token or its mandate finds the trades in flight (signals.py)
    Column("token_iss", String(512)),
    Column("token_jti", String(256)),
    Column("mandate_id", String(128)),
    UniqueConstraint("trade_id", "transition", name="uq_ref_transition_once"),
)
#: On PostgreSQL the transitions' primary key is their step, (trade_id, transition), the unique
#: constraint promoted (same name): ``id`` keeps its numbers (the history's order within a trade,
#: read through the step's index and sorted) but no index of its own, one entry per transition
#: that no query read (18 per lifecycle over the four stores). SQLite's ``id`` is the rowid: no
#: index to save. ``create_schema`` moves a store made before (:func:`_key_transitions_by_step`).
TRANSITION_KEY = "uq_ref_transition_once"
#: Added after the first release: ``create_schema`` adds them to an older ``ref_transitions``.
ACTING_COLUMNS = ("token_iss", "token_jti", "mandate_id")
#: The transitions by acting token and by mandate: read only by :meth:`TradeStore.resting_on`, the
#: settlement's look for the trades an issuer's signal withdraws (``signals.py``). Every store
#: records the acting token of its transitions, so ``create_schema`` makes these in the
#: settlement's store (and a store shared by all services) only, and drops them from the others,
#: where they cost two index entries per transition that nothing reads.
RESTING_INDEXES = {
    "ix_ref_transitions_token_jti": "token_jti",
    "ix_ref_transitions_mandate_id": "mandate_id",
}

signals = Table(
    "ref_signals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("iss", String(512), nullable=False),
    Column("jti", String(256), nullable=False),
    Column("trade_id", String(64), nullable=False),
    Column("event_id", String(36), nullable=False),  # the settlement.exception it raised
    Column("at", BigInteger, nullable=False),
    # a Security Event Token raises at most one exception per trade, however often it is delivered
    UniqueConstraint("iss", "jti", "trade_id", name="uq_ref_signal_once"),
)

outbox = Table(
    "ref_outbox",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    # not unique: no query reads the outbox by it, and an event's id is new with its signature (a
    # transition, unique per trade, has one event); the unique index of stores made before took
    # an entry per event and another per mark (an update that is not HOT): OUTBOX_EVENT_ID_KEY
    Column("event_id", String(36), nullable=False),
    Column("type", String(64), nullable=False),
    # no index on trade_id or txn: no query reads the outbox by them (two index entries per event
    # written for nothing, the txn's on a random key; stores made before lose them: UNUSED_INDEXES)
    Column("trade_id", String(64), nullable=False),
    Column("txn", String(256)),
    Column("jws", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("published_at", BigInteger),
    # delivered to the authorization server's ledger (ledger_forwarder.py), apart from JetStream
    Column("ledger_at", BigInteger),
)
#: The rows not yet in the ledger, by ``seq``: what the ledger forwarder reads (``ledger_at IS NULL
#: ORDER BY seq LIMIT n``: an index scan in order, no sort). A partial index: a row leaves it when
#: it is marked. The full indexes on ``published_at`` and ``ledger_at`` of stores made before held
#: every row version (each mark an update that was not HOT, its column being indexed)
#: (:data:`UNUSED_INDEXES`; docs/settlement.md). The publisher reads from its position by the
#: primary key instead (:meth:`TradeStore.unpublished`): no index names ``published_at``, so its
#: mark is an in-place (HOT) update on PostgreSQL.
UNDELIVERED_INDEX = Index(
    "ix_ref_outbox_undelivered",
    outbox.c.seq,
    postgresql_where=outbox.c.ledger_at.is_(None),
    sqlite_where=outbox.c.ledger_at.is_(None),
)

exceptions = Table(
    "ref_exceptions",
    metadata,
    Column("exception_id", String(80), primary_key=True),  # <trade_id>.<number>
    Column("trade_id", String(64), nullable=False, index=True),
    Column("number", Integer, nullable=False),
    Column("from_state", String(32), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("status", String(16), nullable=False),  # open | escalated | resolved
    Column("resolution", String(16)),  # reconsent | cancel
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)


inbox = Table(
    "ref_inbox",
    metadata,
    # the order this store learned events in: the reporting service's feed (``GET /events``)
    Column("seq", Integer, primary_key=True, autoincrement=True),
    # an upstream event is learned at most once, however often it is delivered
    Column("event_id", String(64), nullable=False, unique=True),
    Column("issuer", String(512), nullable=False),
    Column("type", String(64), nullable=False),
    Column("trade_id", String(64), nullable=False),
    Column("transition", String(64), nullable=False),
    # the signed event; on PostgreSQL a store that serves no feed (an owner's) keeps it only while
    # the event waits for its predecessor (its retry reads it): None once applied on arrival
    # (:func:`_free_inbox_jws`)
    Column("jws", Text),
    Column("received_at", BigInteger, nullable=False),
    # None: its predecessor has not been learned yet (kept, applied when it is)
    Column("applied_at", BigInteger),
)
#: The kept events (not applied), by trade in arrival order: the only reads of the inbox by trade
#: or by ``applied_at`` (the look for kept events, their retry, :meth:`TradeStore.pending`). A
#: partial index: an event applied when it arrives (nearly all) writes no entry in it, where the
#: full indexes on ``trade_id`` and ``applied_at`` of stores made before took two
#: (:data:`UNUSED_INDEXES`).
KEPT_INDEX = Index(
    "ix_ref_inbox_kept",
    inbox.c.trade_id,
    inbox.c.seq,
    postgresql_where=inbox.c.applied_at.is_(None),
    sqlite_where=inbox.c.applied_at.is_(None),
)

cursors = Table(
    "ref_cursors",
    metadata,
    # one per (this store, upstream outbox): the last upstream ``seq`` handed to this store
    Column("consumer", String(300), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)


#: How often a schema creation that lost a race with another process is tried again.
SCHEMA_ATTEMPTS = 5


def _lost_creation_race(exc: Exception) -> bool:
    text_ = str(exc).lower()
    return any(m in text_ for m in ("already exists", "duplicate", "unique", "database is locked"))


async def create_safely(create: Callable[[], Awaitable[None]]) -> None:
    """Run a ``CREATE ... IF NOT EXISTS``-style schema creation that another process may be running
    at the same moment: ``create_all`` checks, then creates, so the loser of a race fails with
    ``already exists`` (SQLite; PostgreSQL: a duplicate relation or type). It is tried again (up
    to :data:`SCHEMA_ATTEMPTS` times) and then finds the tables made."""
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            await create()
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            if attempt + 1 == SCHEMA_ATTEMPTS or not _lost_creation_race(exc):
                raise
            await asyncio.sleep(0.05 * (attempt + 1))


#: ``pg_advisory_xact_lock`` keys of the tables whose ``seq`` readers follow with a cursor (the
#: outbox: the dispatcher; the inbox: the reporting feed), as 64-bit integers. Advisory locks are
#: per database, and each store has its own.
APPEND_LOCKS = {
    "ref_outbox": int.from_bytes(b"tp-rfout", "big") & 0x7FFF_FFFF_FFFF_FFFF,
    "ref_inbox": int.from_bytes(b"tp-rfinb", "big") & 0x7FFF_FFFF_FFFF_FFFF,
}


async def append(conn: AsyncConnection, table: Table, row: Mapping[str, Any]) -> None:
    """Insert ``row`` into ``table`` (:data:`APPEND_LOCKS`), as the LAST statement of its
    transaction, so that the tables' ``seq`` order is their commit order and a reader that saw
    ``seq`` n has seen (or will never see: rolled back) every row below n.

    PostgreSQL takes ``seq`` from a sequence at the insert, and transactions commit in another
    order than they took their numbers: a reader could see n + 1 committed while n is still in
    flight, move its cursor past n, and never read it. Here the insert first takes the table's
    transaction-scoped advisory lock, released after the commit is visible: the next writer takes
    its number only then. Appends to one table serialize over their insert and commit (nothing
    else runs under the lock but a read: the insert cannot wait on another transaction's row, as
    only holders of the lock insert). SQLite has one writer, from its first write to its commit: nothing to do."""
    await lock_appends(conn, table)
    await conn.execute(insert(table).values(**row))


async def lock_appends(conn: AsyncConnection, table: Table) -> None:
    """Take ``table``'s append lock until the transaction ends (PostgreSQL; SQLite: its single
    writer)."""
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({APPEND_LOCKS[table.name]})")


async def _kept(conn: AsyncConnection, trade_id: str, event_id: str) -> bool:
    """Whether another event of the trade is kept in the inbox (its predecessor not applied)."""
    found = await conn.execute(
        select(inbox.c.seq)
        .where(
            and_(
                inbox.c.trade_id == trade_id,
                inbox.c.applied_at.is_(None),
                inbox.c.event_id != event_id,
            )
        )
        .limit(1)
    )
    return found.first() is not None


async def _forward(conn: AsyncConnection, consumer: str, seq: int) -> bool:
    """Move an existing cursor forward to ``seq``; False if it has no row or is there already."""
    moved = await conn.execute(
        update(cursors)
        .where(and_(cursors.c.consumer == consumer, cursors.c.seq < seq))
        .values(seq=seq, updated_at=_ms())
    )
    return bool(moved.rowcount == 1)


def _ms(now: float | None = None) -> int:
    return int((now if now is not None else time.time()) * 1000)


class NotFound(Exception):
    """No such trade (or exception)."""


@dataclass(frozen=True, slots=True)
class Acting:
    """The token a transition was made with: its issuer, ``jti`` and mandate id (any may be None)."""

    token_iss: str | None = None
    token_jti: str | None = None
    mandate_id: str | None = None

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Acting:
        iss, jti, mandate = claims.get("iss"), claims.get("jti"), claims.get("mandate")
        mandate_id = mandate.get("id") if isinstance(mandate, dict) else None
        return cls(
            iss[:512] if isinstance(iss, str) else None,
            jti[:256] if isinstance(jti, str) else None,
            mandate_id[:128] if isinstance(mandate_id, str) else None,
        )

    def as_dict(self) -> dict[str, str]:
        """The members that are set (an event's ``acting``)."""
        pairs = (("iss", self.token_iss), ("jti", self.token_jti), ("mandate_id", self.mandate_id))
        return {k: v for k, v in pairs if v is not None}

    @classmethod
    def from_event(cls, claims: Mapping[str, Any]) -> Acting:
        """What a learned event's transition was made with (its ``acting`` member)."""
        acting = claims.get("acting")
        if not isinstance(acting, dict):
            return NO_TOKEN
        iss, jti, mandate_id = acting.get("iss"), acting.get("jti"), acting.get("mandate_id")
        return cls(
            iss[:512] if isinstance(iss, str) else None,
            jti[:256] if isinstance(jti, str) else None,
            mandate_id[:128] if isinstance(mandate_id, str) else None,
        )


NO_TOKEN = Acting()


@dataclass(frozen=True, slots=True)
class KeyedAnswer:
    """A request's Idempotency-Key stored with the transition it answers, in the transition's own
    statement (PostgreSQL, ``store_pg``): ``pending`` is the SDK's unclaimed key, ``render`` the
    response the transition's result (its :class:`TransitionRecord`, or the :class:`Trade` of a
    creation) makes. Given to the one write whose result is the request's answer; elsewhere (on
    SQLite, or a transition that keeps its transaction) only ``pending.key`` is recorded and the
    caller stores the answer after the commit."""

    pending: InTransaction
    render: Callable[[Any], StoredResponse]

    @property
    def key(self) -> str:
        return self.pending.key


#: An Idempotency-Key as the services pass it to their store: its text, or a :class:`KeyedAnswer`.
Key = str | KeyedAnswer | None


def _key_text(key: Key) -> str | None:
    return key.key if isinstance(key, KeyedAnswer) else key


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    trade_id: str
    transition: str
    source: str | None
    target: str
    actor: str
    idempotency_key: str | None
    event_id: str
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "trade_id": self.trade_id,
            "transition": self.transition,
            "from": self.source,
            "to": self.target,
            "actor": self.actor,
            "idempotency_key": self.idempotency_key,
            "event_id": self.event_id,
            "at": self.at,
        }


class NotOwned(Exception):
    """The transition belongs to another service's store: it is not decided here (a routing error,
    never a client's: each route goes to the owner, docs/settlement.md "Stores")."""

    def __init__(self, service: str, transition: str) -> None:
        super().__init__(
            f"the {service} store does not own {transition} (owner: {machine.owner(transition)})"
        )
        self.service, self.transition = service, transition


#: What :meth:`TradeStore.learn` did with an upstream event (:data:`SKIPPED`: nothing, the event
#: does not concern this store: :func:`machine.concerns`).
APPLIED, KNOWN, PENDING, SKIPPED = "applied", "known", "pending", "skipped"


def concerns(service: str | None, claims: Mapping[str, Any]) -> bool:
    """Whether the store of ``service`` learns the upstream event of ``claims``
    (:func:`machine.concerns`, from the event's transition, ``from``, ``state`` and, for a
    ``cancel`` or an escalation, ``data.from_state``)."""
    data = claims.get("data")
    left = data.get("from_state") if isinstance(data, dict) else None
    source, target = claims.get("from"), claims.get("state")
    return machine.concerns(
        service,
        str(claims.get("transition")),
        source if isinstance(source, str) else None,
        target if isinstance(target, str) else None,
        left if isinstance(left, str) else None,
    )


class DuplicateTransition(Exception):
    """The transition already happened to this trade: refused for ever (409)."""

    def __init__(self, record: TransitionRecord) -> None:
        super().__init__(f"{record.transition} already happened to trade {record.trade_id}")
        self.record = record


class OutOfOrder(Exception):
    """The trade is not in the transition's source state (409)."""

    def __init__(self, trade_id: str, transition: str, state: str, expected: str) -> None:
        super().__init__(f"trade {trade_id} is {state}; {transition} needs {expected}")
        self.trade_id, self.transition, self.state, self.expected = (
            trade_id,
            transition,
            state,
            expected,
        )


@dataclass(frozen=True, slots=True)
class Trade:
    trade_id: str
    state: str
    account: str
    instrument: str
    side: str
    quantity: str
    amount: str
    currency: str
    txn: str | None
    envelope: dict[str, Any]
    proposer: str | None
    allocation: Any
    settlement: Any
    exceptions: int
    version: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "trade_id": self.trade_id,
            "state": self.state,
            "account": self.account,
            "instrument": self.instrument,
            "side": self.side,
            "quantity": self.quantity,
            "amount": self.amount,
            "currency": self.currency,
            "txn": self.txn,
            "envelope": self.envelope,
            "allocation": self.allocation,
            "settlement": self.settlement,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event_id: str
    type: str
    trade_id: str
    jws: str
    published: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class ExceptionRecord:
    exception_id: str
    trade_id: str
    number: int
    from_state: str
    reason: str
    detail: str
    status: str
    resolution: str | None
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "exception_id": self.exception_id,
            "trade_id": self.trade_id,
            "from_state": self.from_state,
            "reason": self.reason,
            "detail": self.detail,
            "status": self.status,
            "resolution": self.resolution,
            "created_at": self.created_at,
        }


def _loads(raw: str | None) -> Any:
    return orjson.loads(raw) if raw is not None else None


def _trade(row: Any) -> Trade:
    return _trade_of(row._mapping)


def _trade_of(m: Mapping[str, Any]) -> Trade:
    return Trade(
        m["trade_id"],
        m["state"],
        m["account"],
        m["instrument"],
        m["side"],
        m["quantity"],
        m["amount"],
        m["currency"],
        m["txn"],
        _loads(m["envelope"]),
        m["proposer"],
        _loads(m["allocation"]),
        _loads(m["settlement"]),
        m["exceptions"],
        m["version"],
    )


def _transition(row: Any) -> TransitionRecord:
    m = row._mapping
    return TransitionRecord(
        m["trade_id"],
        m["transition"],
        m["source"],
        m["target"],
        m["actor"],
        m["idempotency_key"],
        m["event_id"],
        m["at"] / 1000,
    )


def _exception(row: Any) -> ExceptionRecord:
    m = row._mapping
    return ExceptionRecord(
        m["exception_id"],
        m["trade_id"],
        m["number"],
        m["from_state"],
        m["reason"],
        m["detail"],
        m["status"],
        m["resolution"],
        m["created_at"] / 1000,
    )


class TradeStore:
    """One service's store. ``signer`` signs the outbox events (None for the reporting store,
    which writes none); ``appended`` wakes long-polls. ``service``: the service whose transitions
    this store decides (:func:`machine.owner`): ``execution``, ``allocation``, ``settlement`` or
    ``reporting`` (none: a read model); None: all four services on this one store (the compact
    configuration, one compare-and-set for the whole machine)."""

    def __init__(
        self, db: Database, signer: EventSigner | None, *, service: str | None = None
    ) -> None:
        if service is not None and service not in machine.SERVICES:
            raise ValueError(f"unknown service {service}")
        if signer is None and service != machine.REPORTING:
            raise ValueError("a store that owns transitions needs an event signer")
        self.db, self._signer, self.service = db, signer, service
        self._appended = asyncio.Event()
        #: The events this store object committed through PostgreSQL's one-statement path, by
        #: outbox ``seq`` (and their ``seq`` by event id), while :meth:`keep_committed` is on: the
        #: embedded hand-off of this process takes them from here rather than reading them back
        #: (``handoff.Dispatcher``). At most :data:`KEPT_COMMITTED`, the oldest out first.
        self._committed: dict[int, StoredEvent] | None = None
        self._committed_seq: dict[str, int] = {}
        #: The trades as this object last read or moved them, by id (at most :data:`KEPT_TRADES`,
        #: the oldest out first): :meth:`last_known`. Its own transition updates an entry; any
        #: other write of it to a trade (a learned event, an exception, an escalation) drops it.
        self._known: dict[str, Trade] = {}
        #: The publisher's position in the outbox: every row up to this ``seq`` is published
        #: (:meth:`unpublished` reads after it, by the primary key). 0 at start: the first read
        #: finds the oldest unpublished row. Moved by reads only: to just before the first row a
        #: read found (none published before it, in commit order: ``append``), or, when a read
        #: found none, to the highest ``seq`` marked before it (:attr:`_marked`).
        self._published_through = 0
        self._marked = 0

    @property
    def feeds(self) -> bool:
        """Whether this store serves the events feed (``GET /events``, :meth:`feed_after`): the
        reporting store, or one shared by all services. Only such a store keys its inbox by
        ``seq`` and, on PostgreSQL, keeps the signed event of every learned event."""
        return self.service in (None, machine.REPORTING)

    @property
    def signer(self) -> EventSigner:
        if self._signer is None:
            raise NotOwned(self.service or "", "any event")
        return self._signer

    @property
    def signs(self) -> bool:
        return self._signer is not None

    def owns(self, transition: str) -> bool:
        """Whether this store decides ``transition`` (else it only learns it)."""
        return self.service is None or machine.owner(transition) == self.service

    def _owned(self, transition: str) -> None:
        if not self.owns(transition):
            raise NotOwned(self.service or "", transition)

    def last_known(self, trade_id: str) -> Trade | None:
        """The trade as this object last read it or moved it along one of its own transitions
        (None: not known here). Possibly stale: another process (or another store object) may
        have moved it since. Good for the pre-check and the PDP's context of a step whose source
        state it shows, since the transition's compare-and-set is what decides (a stale entry
        ends there with the store's own answer: duplicate or out of order); anything else reads
        the store (:meth:`trade`)."""
        return self._known.get(trade_id)

    def _remember(self, trade: Trade) -> None:
        known = self._known
        known.pop(trade.trade_id, None)
        if len(known) >= KEPT_TRADES:
            del known[next(iter(known))]
        known[trade.trade_id] = trade

    def _moved(
        self, trade_id: str, transition: machine.Transition, updates: Mapping[str, Any]
    ) -> None:
        """Update the known trade (if any) as this object's transition just moved it (an entry
        in another state than the source is dropped: something else moved the trade meanwhile)."""
        before = self._known.get(trade_id)
        if before is None or before.state != transition.source:
            self._known.pop(trade_id, None)
            return
        fields: dict[str, Any] = {k: v for k, v in updates.items() if k in _MOVED_FIELDS}
        self._remember(
            replace(before, state=transition.target, version=before.version + 1, **fields)
        )

    def keep_committed(self) -> None:
        """Keep the events this object commits (PostgreSQL's one-statement path) for the embedded
        hand-off of this process (:meth:`committed_through`)."""
        if self._committed is None:
            self._committed = {}

    def _kept(self, seq: int | None, event: Mapping[str, Any]) -> None:
        if self._committed is None or seq is None:
            return
        while len(self._committed) >= KEPT_COMMITTED:
            del self._committed[next(iter(self._committed))]
        while len(self._committed_seq) >= KEPT_COMMITTED:
            del self._committed_seq[next(iter(self._committed_seq))]
        self._committed[seq] = StoredEvent(
            seq, event["event_id"], event["type"], event["trade_id"], event["jws"], False,
            event["created_at"] / 1000,
        )  # fmt: skip
        self._committed_seq[event["event_id"]] = seq

    def committed_seq(self, event_id: str) -> int | None:
        """The outbox ``seq`` of one of the last :data:`KEPT_COMMITTED` events this object
        committed (kept or already forgotten), else None."""
        return self._committed_seq.get(event_id)

    def committed_through(self, after: int, seq: int) -> list[StoredEvent] | None:
        """The outbox's events after ``after`` up to ``seq``, if this object committed and keeps
        every one of them (``seq`` order is commit order: ``append``); None if any is missing (a
        gap, another process's commit, one forgotten): read the outbox then."""
        kept = self._committed
        if kept is None:
            return None
        found = []
        for number in range(after + 1, seq + 1):
            event = kept.get(number)
            if event is None:
                return None
            found.append(event)
        return found

    def committed_after(self, seq: int) -> list[StoredEvent]:
        """The kept events right after ``seq``, as far as they are contiguous."""
        kept = self._committed or {}
        found: list[StoredEvent] = []
        while (event := kept.get(seq + 1 + len(found))) is not None:
            found.append(event)
        return found

    def forget_committed(self, through: int) -> None:
        """Drop the kept events up to ``through`` (handed off to every route; their ``seq`` by
        event id stays known: :meth:`committed_seq`)."""
        kept = self._committed
        if not kept:
            return
        for number in [n for n in kept if n <= through]:
            del kept[number]

    async def create_schema(self) -> None:
        """Create the tables (and upgrade older ones). Safe when several processes start at once
        on one database: a creation that loses the race (``table ... already exists`` on SQLite,
        a duplicate type or relation on PostgreSQL) is retried, and then finds the tables."""

        async def create() -> None:
            async with self.db.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # processes starting at once on one database create and upgrade one at a
                    # time (dropping an index while another creates one could deadlock)
                    await store_pg.lock_schema(conn)
                await conn.run_sync(metadata.create_all)
                await conn.run_sync(_add_acting_columns)
                await conn.run_sync(_add_ledger_column)
                await conn.run_sync(_upgrade_indexes, self.service in (None, machine.SETTLEMENT))
                if conn.dialect.name == "postgresql":
                    await conn.run_sync(_key_inbox, self.feeds)
                    await conn.run_sync(_free_inbox_jws)
                if conn.dialect.name == "postgresql":
                    await store_pg.create_functions(conn)

        await create_safely(create)

    # ------------------------------------------------------------------ writes

    async def create(
        self,
        trade_id: str,
        order: Mapping[str, str],
        actor: str,
        envelope: Envelope,
        key: Key,
        acting: Acting = NO_TOKEN,
    ) -> tuple[Trade, TransitionRecord]:
        """A new trade in state ``created``, its ``create`` transition and ``order.created``;
        ``acting``: the token it was made with."""
        self._owned("create")
        idempotency_key = _key_text(key)
        now = time.time()
        row = {
            "trade_id": trade_id,
            "state": machine.CREATED,
            **{f: order[f] for f in ORDER_FIELDS},
            "txn": envelope.txn,
            "envelope": orjson.dumps(envelope.as_dict()).decode(),
            "proposer": None,
            "allocation": None,
            "settlement": None,
            "exceptions": 0,
            "version": 1,
            "created_at": _ms(now),
            "updated_at": _ms(now),
        }
        if not self.db.is_sqlite:
            return await self._create_pg(row, actor, key, envelope, order, now, acting)
        try:
            async with self.db.transaction() as conn:
                await conn.execute(insert(trades).values(**row))
                record, event = await self._record(
                    conn,
                    trade_id,
                    "create",
                    None,
                    machine.CREATED,
                    "order.created",
                    actor,
                    idempotency_key,
                    envelope,
                    dict(order),
                    now,
                    acting,
                )
                await append(conn, outbox, event)
        except IntegrityError:
            raise DuplicateTransition(await self._existing(trade_id, "create")) from None
        self._notify()
        # the row as inserted (the envelope through the same JSON): what reading it back would give
        trade = _trade_of(row)
        self._remember(trade)
        return trade, record

    async def apply(
        self,
        trade_id: str,
        transition: machine.Transition,
        actor: str,
        envelope: Envelope,
        key: Key,
        *,
        data: Mapping[str, Any] | None = None,
        updates: Mapping[str, Any] | None = None,
        exception: ExceptionRecord | None = None,
        resolve: tuple[str, str] | None = None,
        acting: Acting = NO_TOKEN,
        signal: tuple[str, str] | None = None,
    ) -> TransitionRecord:
        """Move the trade along ``transition``, record it and its signed event, in one transaction.
        ``updates``: trade columns set with the move (JSON columns given as objects);
        ``exception``: the exception row an ``exception#n`` transition opens; ``resolve``:
        (exception_id, resolution) that a re-consent or cancel closes; ``acting``: the token the
        transition is made with; ``signal``: (iss, jti) of the Security Event Token that caused
        it, recorded so that the same SET never moves this trade again (:meth:`signalled`).
        ``key``: the request's Idempotency-Key (:class:`KeyedAnswer`: stored with the transition
        on PostgreSQL; :class:`~trustplane.pep.idempotency.KeyTaken` if a live row holds it)."""
        self._owned(transition.name)
        idempotency_key = _key_text(key)
        now = time.time()
        columns = {
            name: orjson.dumps(value).decode()
            if name in ("allocation", "settlement") and value is not None
            else value
            for name, value in (updates or {}).items()
        }
        if _one_statement(self.db, updates, exception, resolve, signal):
            record = await self._apply_pg(
                trade_id, transition, actor, envelope, key, data, columns, now, acting
            )
            self._moved(trade_id, transition, updates or {})
            return record
        # the SQL expressions only here: building them costs more than the one-statement call's
        # Python (about 35 us each)
        values: dict[str, Any] = {
            "state": transition.target,
            "version": trades.c.version + 1,
            "updated_at": _ms(now),
            **columns,
        }
        if exception is not None:
            values["exceptions"] = trades.c.exceptions + 1
        try:
            async with self.db.transaction() as conn:
                moved = await conn.execute(
                    update(trades)
                    .where(and_(trades.c.trade_id == trade_id, trades.c.state == transition.source))
                    .values(**values)
                )
                if moved.rowcount != 1:
                    raise _Lost()
                record, event = await self._record(
                    conn,
                    trade_id,
                    transition.name,
                    transition.source,
                    transition.target,
                    transition.event,
                    actor,
                    idempotency_key,
                    envelope,
                    {**(data or {}), **({"exception": exception.as_dict()} if exception else {})},
                    now,
                    acting,
                )
                if signal is not None:
                    await conn.execute(
                        insert(signals).values(
                            iss=signal[0][:512],
                            jti=signal[1][:256],
                            trade_id=trade_id,
                            event_id=record.event_id,
                            at=_ms(now),
                        )
                    )
                if exception is not None:
                    await conn.execute(
                        insert(exceptions).values(
                            exception_id=exception.exception_id,
                            trade_id=trade_id,
                            number=exception.number,
                            from_state=exception.from_state,
                            reason=exception.reason,
                            detail=exception.detail,
                            status="open",
                            created_at=_ms(now),
                            updated_at=_ms(now),
                        )
                    )
                if resolve is not None:
                    await self._close_exception(conn, resolve[0], resolve[1], now)
                await append(conn, outbox, event)
        except BaseException as exc:
            self._known.pop(trade_id, None)
            if isinstance(exc, _Lost | IntegrityError):
                raise await self.why(trade_id, transition) from None
            raise
        if exception is None and resolve is None and signal is None:
            self._moved(trade_id, transition, updates or {})
        else:
            self._known.pop(trade_id, None)
        self._notify()
        return record

    async def _create_pg(
        self,
        row: Mapping[str, Any],
        actor: str,
        key: Key,
        envelope: Envelope,
        order: Mapping[str, str],
        now: float,
        acting: Acting,
    ) -> tuple[Trade, TransitionRecord]:
        """:meth:`create` on PostgreSQL: one statement (``store_pg``)."""
        trade_id, idempotency_key = str(row["trade_id"]), _key_text(key)
        event = self._event(
            "order.created", trade_id, "create", machine.CREATED, envelope, dict(order), now,
            None, acting,
        )  # fmt: skip
        trade = _trade_of(row)
        record = TransitionRecord(
            trade_id, "create", None, machine.CREATED, actor, idempotency_key,
            event["event_id"], _ms(now) / 1000,
        )  # fmt: skip
        fields = [str(row[f]) for f in ORDER_FIELDS]
        params = (
            trade_id, None, machine.CREATED, fields, row["envelope"], None, None, "create",
            actor, idempotency_key, event["event_id"], acting.token_iss, acting.token_jti,
            acting.mandate_id, event["type"], envelope.txn, event["jws"], _ms(now),
            APPEND_LOCKS["ref_outbox"], *_answer_params(key, trade),
        )  # fmt: skip
        try:
            _moved, seq = await self._apply_call(params, key)
        except store_pg.Duplicate:
            raise DuplicateTransition(await self._existing(trade_id, "create")) from None
        self._kept(seq, event)
        self._notify()
        self._remember(trade)
        return trade, record

    async def _apply_pg(
        self,
        trade_id: str,
        transition: machine.Transition,
        actor: str,
        envelope: Envelope,
        key: Key,
        data: Mapping[str, Any] | None,
        columns: Mapping[str, Any],
        now: float,
        acting: Acting,
    ) -> TransitionRecord:
        """:meth:`apply` of a plain transition on PostgreSQL: one statement (``store_pg``);
        ``columns``: the trade columns it sets besides the state (JSON columns as text)."""
        name, source, target = transition.name, transition.source, transition.target
        idempotency_key = _key_text(key)
        event = self._event(
            transition.event, trade_id, name, target, envelope, dict(data or {}), now, source,
            acting,
        )  # fmt: skip
        record = TransitionRecord(
            trade_id, name, source, target, actor, idempotency_key, event["event_id"],
            _ms(now) / 1000,
        )  # fmt: skip
        allocation = (
            [columns["allocation"], columns["proposer"]] if "allocation" in columns else None
        )
        settlement = [columns["settlement"]] if "settlement" in columns else None
        params = (
            trade_id, source, target, None, None, allocation, settlement, name, actor,
            idempotency_key, event["event_id"], acting.token_iss, acting.token_jti,
            acting.mandate_id, event["type"], envelope.txn, event["jws"], _ms(now),
            APPEND_LOCKS["ref_outbox"], *_answer_params(key, record),
        )  # fmt: skip
        try:
            moved, seq = await self._apply_call(params, key)
        except store_pg.Duplicate:
            moved, seq = False, None
        except BaseException:
            self._known.pop(trade_id, None)
            raise
        if not moved:
            self._known.pop(trade_id, None)
            raise await self.why(trade_id, transition)
        self._kept(seq, event)
        self._notify()
        return record

    async def _apply_call(self, params: tuple[Any, ...], key: Key) -> tuple[bool, int | None]:
        """One call of ``store_pg.applied``: whether it moved and its event's outbox ``seq``;
        :class:`KeyTaken` when the request's key was held (nothing written). A stored key is
        marked on its ``pending``."""
        moved, held, seq = await store_pg.applied(self.db, params)
        if held is not None:
            raise KeyTaken(record_of(held))
        if moved and isinstance(key, KeyedAnswer):
            key.pending.stored = True
        return moved, seq

    async def escalate(
        self, exception_id: str, actor: str, envelope: Envelope, note: str
    ) -> ExceptionRecord:
        """Mark an open exception escalated (the trade stays in ``exception``), with its event."""
        self._owned("escalate")
        now = time.time()
        async with self.db.transaction() as conn:
            found = (
                await conn.execute(
                    select(exceptions).where(exceptions.c.exception_id == exception_id)
                )
            ).first()
            if found is None:
                raise NotFound(exception_id)
            record = _exception(found)
            self._known.pop(record.trade_id, None)
            if record.status == "resolved":
                raise DuplicateTransition(await self._existing_in(conn, record))
            # conditional: a resolution that committed after the read above wins (the UPDATE
            # waits for its row lock and re-checks), and the escalation is refused, never
            # written over it
            escalated = await conn.execute(
                update(exceptions)
                .where(
                    and_(
                        exceptions.c.exception_id == exception_id,
                        exceptions.c.status != "resolved",
                    )
                )
                .values(status="escalated", updated_at=_ms(now))
            )
            if escalated.rowcount != 1:
                raise DuplicateTransition(await self._existing_in(conn, record))
            event = self._event(
                "exception.escalated",
                record.trade_id,
                f"escalate#{record.number}",
                machine.EXCEPTION,
                envelope,
                {
                    "exception_id": exception_id,
                    "actor": actor,
                    "note": note,
                    "from_state": record.from_state,
                },
                now,
                machine.EXCEPTION,
            )
            await append(conn, outbox, event)
        self._notify()
        return await self.exception(exception_id)

    async def _existing_in(
        self, conn: AsyncConnection, record: ExceptionRecord
    ) -> TransitionRecord:
        rows = (
            await conn.execute(
                select(transitions).where(
                    and_(
                        transitions.c.trade_id == record.trade_id,
                        transitions.c.transition.in_([f"reconsent#{record.number}", "cancel"]),
                    )
                )
            )
        ).all()
        return _transition(rows[0])

    async def _close_exception(
        self, conn: AsyncConnection, exception_id: str, resolution: str, now: float
    ) -> None:
        closed = await conn.execute(
            update(exceptions)
            .where(
                and_(exceptions.c.exception_id == exception_id, exceptions.c.status != "resolved")
            )
            .values(status="resolved", resolution=resolution, updated_at=_ms(now))
        )
        if closed.rowcount != 1:
            raise _Lost()

    async def _record(
        self,
        conn: AsyncConnection,
        trade_id: str,
        name: str,
        source: str | None,
        target: str,
        event_type: str,
        actor: str,
        idempotency_key: str | None,
        envelope: Envelope,
        data: Mapping[str, Any],
        now: float,
        acting: Acting,
    ) -> tuple[TransitionRecord, dict[str, Any]]:
        """The transition's row, inserted, and its signed event's outbox row, to be appended by
        the caller as the transaction's last statement (:func:`append`)."""
        event = self._event(event_type, trade_id, name, target, envelope, data, now, source, acting)
        event_id = event["event_id"]
        await conn.execute(
            insert(transitions).values(
                trade_id=trade_id,
                transition=name,
                source=source,
                target=target,
                actor=actor,
                idempotency_key=idempotency_key,
                event_id=event_id,
                at=_ms(now),
                token_iss=acting.token_iss,
                token_jti=acting.token_jti,
                mandate_id=acting.mandate_id,
            )
        )
        record = TransitionRecord(
            trade_id, name, source, target, actor, idempotency_key, event_id, _ms(now) / 1000
        )
        return record, event

    def _event(
        self,
        event_type: str,
        trade_id: str,
        name: str,
        state: str,
        envelope: Envelope,
        data: Mapping[str, Any],
        now: float,
        source: str | None = None,
        acting: Acting = NO_TOKEN,
    ) -> dict[str, Any]:
        """The signed event's outbox row."""
        event_id, jws = self.signer.sign(
            event_type, trade_id, name, state, envelope, data, now=now, source=source,
            acting=acting.as_dict(),
        )  # fmt: skip
        return {
            "event_id": event_id,
            "type": event_type,
            "trade_id": trade_id,
            "txn": envelope.txn,
            "jws": jws,
            "created_at": _ms(now),
        }

    async def why(self, trade_id: str, transition: machine.Transition) -> Exception:
        """Why a transition did not apply: it already happened, the trade is elsewhere, or none."""
        done = await self._first(
            select(transitions).where(
                and_(
                    transitions.c.trade_id == trade_id,
                    transitions.c.transition == transition.name,
                )
            )
        )
        if done is not None:
            return DuplicateTransition(_transition(done))
        row = await self._first(select(trades.c.state).where(trades.c.trade_id == trade_id))
        if row is None:
            return NotFound(trade_id)
        return OutOfOrder(trade_id, transition.name, row.state, transition.source)

    async def _existing(self, trade_id: str, name: str) -> TransitionRecord:
        row = await self._first(
            select(transitions).where(
                and_(transitions.c.trade_id == trade_id, transitions.c.transition == name)
            )
        )
        if row is None:
            raise NotFound(trade_id)
        return _transition(row)

    async def _all(self, query: Executable) -> Sequence[Row[Any]]:
        """The rows of one read-only statement. PostgreSQL: on the autocommit engine, one round
        trip (a transaction around it adds ``BEGIN`` and ``ROLLBACK``, two more, and at READ
        COMMITTED each statement has its own snapshot anyway), again once if the connection was
        dead; SQLite: :meth:`Database.read`. A read whose statements must share one snapshot
        keeps a transaction."""
        if self.db.is_sqlite:
            async with self.db.read() as conn:
                return (await conn.execute(query)).all()
        for attempt in (1, 2):
            try:
                async with self.db.autocommit_engine.connect() as conn:
                    return (await conn.execute(query)).all()
            except DBAPIError as exc:
                if attempt == 2 or not is_disconnect(exc):
                    raise
        raise AssertionError("unreachable")

    async def _first(self, query: Executable) -> Row[Any] | None:
        rows = await self._all(query)
        return rows[0] if rows else None

    async def _scalar(self, query: Executable) -> Any:
        row = await self._first(query)
        return row[0] if row is not None else None

    def _notify(self) -> None:
        self._appended.set()
        self._appended = asyncio.Event()

    # ------------------------------------------------------------------ learning upstream state

    async def learn(self, claims: Mapping[str, Any], jws: str) -> str:
        """Apply a VERIFIED upstream event (``verify_event`` with the upstream's JWKS and issuer;
        :mod:`.handoff` does it) as a *learned* transition: the inbox row (unique event id), the
        same compare-and-set on the trade's state (the event's ``from``) and the same
        ``(trade_id, transition)`` constraint as an owned transition, actor ``event:<iss>``, no
        outbox row. One transaction. Returns :data:`APPLIED`; :data:`KNOWN` for an event (or a
        transition) learned before, a no-op; :data:`PENDING` when the trade is not in the event's
        source state yet (its predecessor, from another upstream, has not arrived): the event is
        kept in the inbox and applied as soon as the predecessor is (:meth:`_retry_pending`);
        :data:`SKIPPED`, nothing written, for an event that does not concern this store (a
        transition made after this owner's last step: :func:`concerns`).
        A store never learns a transition it owns (:class:`NotOwned`)."""
        outcome, _moved = await self._learn(claims, jws, None)
        return outcome

    async def learn_through(
        self, claims: Mapping[str, Any], jws: str, consumer: str, seq: int
    ) -> tuple[str, int]:
        """:meth:`learn`, and ``consumer``'s cursor moved forward to ``seq`` in the same
        transaction (the hand-off of a batch's last event: one commit for both; the cursor
        never passes an event whose learning rolled back); or on its own right after, when that
        transaction could not move it (no row yet, a racing delivery, or another dispatcher moved
        it further). The outcome and the cursor now (:meth:`advance`)."""
        outcome, moved = await self._learn(claims, jws, (consumer, seq))
        return outcome, seq if moved else await self.advance(consumer, seq)

    async def learn_all(
        self, events: Sequence[tuple[Mapping[str, Any], str]], consumer: str, seq: int
    ) -> tuple[list[str], int]:
        """:meth:`learn` of each of ``events`` (claims, JWS), in order, and ``consumer``'s cursor
        moved forward to ``seq`` with the last one (:meth:`learn_through`): each outcome, and the
        cursor now. On PostgreSQL in one statement (one transaction, one commit for all:
        :func:`store_pg.learn_all`); when it hits a unique constraint (a racing delivery of one of
        them), nothing of it was written and they are learned one by one, as on SQLite."""
        if not events:
            return [], await self.advance(consumer, seq)
        if self.db.is_sqlite or len(events) == 1:
            return await self._learn_each(events, consumer, seq)
        for claims, _jws in events:
            if self.service is None or self.owns(str(claims.get("transition"))):
                raise NotOwned(self.service or "all", f"learning {claims.get('transition')}")
        todo = [(c, j) for c, j in events if concerns(self.service, c)]
        if not todo:
            return [SKIPPED] * len(events), await self.advance(consumer, seq)
        for claims, _jws in todo:
            self._known.pop(str(claims["trade_id"]), None)
        now, last = time.time(), len(todo) - 1
        calls = [
            _learning(c, j, now, (consumer, seq) if n == last else None, self.feeds)
            for n, (c, j) in enumerate(todo)
        ]
        try:
            results = await store_pg.learn_all(self.db, calls)
        except store_pg.Duplicate:
            return await self._learn_each(events, consumer, seq)
        found: dict[str, str] = {}
        for (claims, _jws), (outcome, _moved, waiting) in zip(todo, results, strict=True):
            found[str(claims["jti"])] = await self._after_learning(claims, outcome, waiting)
        if any(o != KNOWN for o in found.values()):
            self._notify()
        outcomes = [found.get(str(c["jti"]), SKIPPED) for c, _j in events]
        return outcomes, seq if results[-1][1] else await self.advance(consumer, seq)

    async def _learn_each(
        self, events: Sequence[tuple[Mapping[str, Any], str]], consumer: str, seq: int
    ) -> tuple[list[str], int]:
        outcomes = [await self.learn(claims, jws) for claims, jws in events[:-1]]
        outcome, cursor = await self.learn_through(*events[-1], consumer, seq)
        return [*outcomes, outcome], cursor

    async def _after_learning(self, claims: Mapping[str, Any], outcome: str, waiting: bool) -> str:
        """What follows a learning transaction's commit: the trade's kept events retried when it
        applied and some wait; when it kept its event, a look again (a racing delivery may have
        applied the predecessor before this commit, and not seen it). The outcome then."""
        trade_id = str(claims["trade_id"])
        if outcome == APPLIED and waiting:
            await self._retry_pending(trade_id)
        elif outcome == PENDING:
            await self._retry_pending(trade_id)
            if await self._applied(str(claims["jti"])):
                return APPLIED
        return outcome

    async def _learn(
        self, claims: Mapping[str, Any], jws: str, cursor: tuple[str, int] | None
    ) -> tuple[str, bool]:
        name = str(claims.get("transition"))
        if self.service is None or self.owns(name):
            raise NotOwned(self.service or "all", f"learning {name}")
        if not concerns(self.service, claims):
            return SKIPPED, False
        outcome, moved, waiting = await self._learn_one(claims, jws, cursor)
        return await self._after_learning(claims, outcome, waiting), moved

    async def _applied(self, event_id: str) -> bool:
        row = await self._first(select(inbox.c.applied_at).where(inbox.c.event_id == event_id))
        return row is not None and row.applied_at is not None

    async def _learn_one(
        self, claims: Mapping[str, Any], jws: str, cursor: tuple[str, int] | None = None
    ) -> tuple[str, bool, bool]:
        """One learning transaction (``cursor``: moved in it too); the outcome, whether the cursor
        moved, and whether other events of the trade wait in the inbox (when applied).

        That last look is the transaction's last statement, under the inbox's append lock, so
        that a kept event is never forgotten: a delivery that keeps its event (its predecessor
        not applied when it looked) either committed before this look, which sees it and has it
        retried after the commit, or appends after this commit (the lock) and retries itself
        after its own commit, finding the predecessor applied. (Had it looked for its predecessor
        after an ``UPDATE`` of this transaction, it waited for the row lock and applied.)"""
        now = time.time()
        event_id, trade_id = str(claims["jti"]), str(claims["trade_id"])
        self._known.pop(trade_id, None)
        if not self.db.is_sqlite:
            try:
                outcome, moved, waiting = await store_pg.learn(
                    self.db, _learning(claims, jws, now, cursor, self.feeds)
                )
            except store_pg.Duplicate:
                return KNOWN, False, False
            if outcome != KNOWN:
                self._notify()
            return outcome, moved, waiting
        try:
            async with self.db.transaction() as conn:
                seen = (
                    await conn.execute(
                        select(inbox.c.applied_at).where(inbox.c.event_id == event_id)
                    )
                ).first()
                known = seen is not None and seen.applied_at is not None
                applied = known or await self._apply_learned(conn, claims, now)
                moved = cursor is not None and await _forward(conn, *cursor)
                if known:
                    return KNOWN, moved, False
                if seen is None:  # the inbox row last: it takes the feed's next ``seq``
                    row = {
                        "event_id": event_id[:64],
                        "issuer": str(claims.get("iss"))[:512],
                        "type": str(claims.get("type"))[:64],
                        "trade_id": trade_id[:64],
                        "transition": str(claims.get("transition"))[:64],
                        "jws": jws,
                        "received_at": _ms(now),
                        "applied_at": _ms(now) if applied else None,
                    }
                    await append(conn, inbox, row)
                elif applied:
                    await conn.execute(
                        update(inbox)
                        .where(inbox.c.event_id == event_id)
                        .values(applied_at=_ms(now))
                    )
                    await lock_appends(conn, inbox)
                waiting = applied and await _kept(conn, trade_id, event_id)
        except IntegrityError:
            # a racing delivery of the same event committed first (inbox), or the transition is
            # already recorded here: nothing to do (and nothing moved)
            return KNOWN, False, False
        self._notify()
        return APPLIED if applied else PENDING, moved, waiting

    async def _apply_learned(
        self, conn: AsyncConnection, claims: Mapping[str, Any], now: float
    ) -> bool:
        """The learned transition's move; False when the trade is not (yet) in its source state."""
        name, target, source = claims["transition"], claims.get("state"), claims.get("from")
        trade_id, event_type = str(claims["trade_id"]), claims.get("type")
        raw_data, raw_envelope = claims.get("data"), claims.get("envelope")
        data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
        envelope: dict[str, Any] = raw_envelope if isinstance(raw_envelope, dict) else {}
        if event_type == "exception.escalated":
            return True  # the exception's status, kept by its owner: no move to learn
        done = (
            await conn.execute(
                select(transitions.c.id).where(
                    and_(transitions.c.trade_id == trade_id, transitions.c.transition == name)
                )
            )
        ).first()
        if done is not None:
            return True
        if not isinstance(target, str):
            return False
        if name == "create":
            txn = envelope.get("txn")
            await conn.execute(
                insert(trades).values(
                    trade_id=trade_id,
                    state=target,
                    **{f: str(data.get(f, ""))[:64] for f in ORDER_FIELDS},
                    txn=txn[:256] if isinstance(txn, str) else None,
                    envelope=orjson.dumps(envelope).decode(),
                    exceptions=0,
                    version=1,
                    created_at=_ms(now),
                    updated_at=_ms(now),
                )
            )
        else:
            if not isinstance(source, str):
                return False
            values: dict[str, Any] = {
                "state": target,
                "version": trades.c.version + 1,
                "updated_at": _ms(now),
            }
            if event_type == "allocation.proposed":
                proposer = envelope.get("sub") or envelope.get("client_id")
                values["allocation"] = orjson.dumps(data.get("allocations")).decode()
                values["proposer"] = str(proposer)[:256] if proposer is not None else None
            elif event_type in ("settlement.submitted", "settlement.amended"):
                values["settlement"] = orjson.dumps(data.get("instructions")).decode()
            elif event_type == "settlement.exception":
                values["exceptions"] = trades.c.exceptions + 1
            moved = await conn.execute(
                update(trades)
                .where(and_(trades.c.trade_id == trade_id, trades.c.state == source))
                .values(**values)
            )
            if moved.rowcount != 1:
                return False
        acting = Acting.from_event(claims)
        await conn.execute(
            insert(transitions).values(
                trade_id=trade_id,
                transition=str(name)[:64],
                source=source if isinstance(source, str) else None,
                target=target,
                actor=f"event:{claims.get('iss')}"[:256],
                idempotency_key=None,
                event_id=str(claims["jti"])[:36],
                at=_ms(now),
                token_iss=acting.token_iss,
                token_jti=acting.token_jti,
                mandate_id=acting.mandate_id,
            )
        )
        return True

    async def _retry_pending(self, trade_id: str) -> None:
        """Apply the trade's kept events whose predecessor has now been learned, in arrival order,
        until none moves (each was verified when it arrived)."""
        while True:
            rows = await self._all(
                select(inbox.c.jws)
                .where(and_(inbox.c.trade_id == trade_id, inbox.c.applied_at.is_(None)))
                .order_by(inbox.c.seq)
            )
            progressed = False
            for row in rows:
                if (await self._learn_one(payload_of(row.jws), row.jws))[0] == APPLIED:
                    progressed = True
            if not progressed:
                return

    async def pending(self) -> list[str]:
        """The event ids kept in the inbox, not applied (their predecessor has not arrived)."""
        rows = await self._all(
            select(inbox.c.event_id).where(inbox.c.applied_at.is_(None)).order_by(inbox.c.seq)
        )
        return [r.event_id for r in rows]

    async def cursor(self, consumer: str) -> int:
        """The last upstream outbox ``seq`` handed to this store by ``consumer`` (0: none)."""
        row = await self._first(select(cursors.c.seq).where(cursors.c.consumer == consumer))
        return int(row.seq) if row is not None else 0

    async def advance(self, consumer: str, seq: int) -> int:
        """Move ``consumer``'s cursor forward to ``seq`` (never back: racing dispatchers); the
        cursor now (beyond ``seq`` when another dispatcher moved it further)."""
        for _ in range(2):
            try:
                async with self.db.transaction() as conn:
                    if await _forward(conn, consumer, seq):
                        return seq
                    found = (
                        await conn.execute(
                            select(cursors.c.seq).where(cursors.c.consumer == consumer)
                        )
                    ).first()
                    if found is not None:
                        return int(found.seq)
                    await conn.execute(
                        insert(cursors).values(consumer=consumer, seq=seq, updated_at=_ms())
                    )
                return seq
            except IntegrityError:
                continue  # another dispatcher inserted it first: move it forward
        return await self.cursor(consumer)

    async def feed_after(self, after: int, limit: int = 100) -> list[StoredEvent]:
        """The upstream events this store learned (applied or kept), in the order it received
        them, after its inbox ``seq`` ``after``: the reporting service's feed. A store that
        serves none (:attr:`feeds`) keeps on PostgreSQL no signed event of those it applied on
        arrival (:func:`_free_inbox_jws`): their ``jws`` is empty here."""
        rows = await self._all(
            select(inbox).where(inbox.c.seq > after).order_by(inbox.c.seq).limit(limit)
        )
        return [
            StoredEvent(
                r.seq, r.event_id, r.type, r.trade_id, r.jws or "", False, r.received_at / 1000
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ reads

    async def trade(self, trade_id: str) -> Trade:
        if not self.db.is_sqlite:  # before every step: asyncpg's own statement (``store_pg``)
            found = await store_pg.fetch(self.db, store_pg.TRADE, (trade_id,))
            if not found:
                raise NotFound(trade_id)
            trade = _trade_of(found[0])
        else:
            row = await self._first(select(trades).where(trades.c.trade_id == trade_id))
            if row is None:
                raise NotFound(trade_id)
            trade = _trade(row)
        self._remember(trade)
        return trade

    async def resting_on(
        self, token_iss: str, *, token_jti: str | None = None, mandate_id: str | None = None
    ) -> list[Trade]:
        """The trades in flight (:data:`machine.IN_FLIGHT`) that a transition was made with a token
        of ``token_iss`` whose ``jti`` is ``token_jti``, or which rested on mandate ``mandate_id``
        (mandate ids are scoped by their issuer)."""
        if (token_jti is None) == (mandate_id is None):
            raise ValueError("name either a token jti or a mandate id")
        match = (
            transitions.c.token_jti == token_jti
            if token_jti is not None
            else transitions.c.mandate_id == mandate_id
        )
        ids = (
            select(transitions.c.trade_id)
            .where(and_(transitions.c.token_iss == token_iss, match))
            .distinct()
        )
        query = (
            select(trades)
            .where(and_(trades.c.trade_id.in_(ids), trades.c.state.in_(sorted(machine.IN_FLIGHT))))
            .order_by(trades.c.created_at)
        )
        rows = await self._all(query)
        return [_trade(r) for r in rows]

    async def signalled(self, iss: str, jti: str, trade_id: str) -> bool:
        """Whether the Security Event Token (``iss``, ``jti``) already raised an exception on it."""
        row = await self._first(
            select(signals.c.id).where(
                and_(
                    signals.c.iss == iss[:512],
                    signals.c.jti == jti[:256],
                    signals.c.trade_id == trade_id,
                )
            )
        )
        return row is not None

    async def history(self, trade_id: str) -> list[TransitionRecord]:
        rows = await self._all(
            select(transitions).where(transitions.c.trade_id == trade_id).order_by(transitions.c.id)
        )
        return [_transition(r) for r in rows]

    async def exception(self, exception_id: str) -> ExceptionRecord:
        row = await self._first(select(exceptions).where(exceptions.c.exception_id == exception_id))
        if row is None:
            raise NotFound(exception_id)
        return _exception(row)

    async def list_exceptions(self, status: str | None = None) -> list[ExceptionRecord]:
        query = select(exceptions).order_by(exceptions.c.created_at)
        if status is not None:
            query = query.where(exceptions.c.status == status)
        rows = await self._all(query)
        return [_exception(r) for r in rows]

    async def last_seq(self) -> int:
        """The outbox's highest ``seq`` (0: empty)."""
        found = await self._scalar(select(func.max(outbox.c.seq)))
        return int(found or 0)

    async def events_after(self, after: int, limit: int = 100) -> list[StoredEvent]:
        if not self.db.is_sqlite:  # after every commit (the hand-off): asyncpg's own statement
            found = await store_pg.fetch(self.db, store_pg.EVENTS_AFTER, (after, limit))
            return [_stored_of(r) for r in found]
        rows = await self._all(
            select(outbox).where(outbox.c.seq > after).order_by(outbox.c.seq).limit(limit)
        )
        return [_stored(r) for r in rows]

    async def wait_events(
        self, after: int, wait: float, limit: int = 100, *, feed: bool = False
    ) -> list[StoredEvent]:
        """Long-poll: the events after ``after``, waiting up to ``wait`` seconds for one. Events
        committed by another process are seen within the poll step (0.25 s). ``feed``: the
        learned events (:meth:`feed_after`) rather than the outbox."""
        deadline = time.monotonic() + wait
        read = self.feed_after if feed else self.events_after
        while True:
            found = await read(after, limit)
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            waiter = self._appended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), min(left, 0.25))

    async def unpublished(self, limit: int = 100) -> list[StoredEvent]:
        """The oldest rows not yet published (at most ``limit``), in commit order."""
        after, marked = self._published_through, self._marked
        if not self.db.is_sqlite:  # each publisher round: asyncpg's own statement
            rows = await store_pg.fetch(self.db, store_pg.UNPUBLISHED, (limit, after))
            return self._read_from(after, marked, [_stored_of(r) for r in rows])
        found = await self._all(
            select(outbox)
            .where(and_(outbox.c.seq > after, outbox.c.published_at.is_(None)))
            .order_by(outbox.c.seq)
            .limit(limit)
        )
        return self._read_from(after, marked, [_stored(r) for r in found])

    def _read_from(self, after: int, marked: int, found: list[StoredEvent]) -> list[StoredEvent]:
        """The position moved by a read from ``after`` that found ``found``, the highest ``seq``
        marked before it being ``marked``: every row before the first found is published (the
        read saw every row committed before it: ``seq`` order is commit order), and with none
        found every row up to the marked ones (which existed before the read)."""
        through = found[0].seq - 1 if found else marked
        self._published_through = max(self._published_through, after, through)
        if self._marked == marked:
            self._marked = 0
        return found

    async def mark_published(self, seqs: Sequence[int]) -> None:
        """Mark ``seqs`` published (those not marked yet). PostgreSQL: one statement on the
        autocommit engine, straight to asyncpg (no ``BEGIN``/``COMMIT``, no compilation)."""
        if not seqs:
            return
        if not self.db.is_sqlite:
            await store_pg.execute(self.db, store_pg.MARK_PUBLISHED, (list(seqs), _ms()))
        else:
            async with self.db.transaction() as conn:
                await conn.execute(
                    update(outbox)
                    .where(and_(outbox.c.seq.in_(list(seqs)), outbox.c.published_at.is_(None)))
                    .values(published_at=_ms())
                )
        self._marked = max(self._marked, *seqs)

    async def mark_then_unpublished(
        self, seqs: Sequence[int], limit: int = 100
    ) -> list[StoredEvent]:
        """:meth:`mark_published` of ``seqs``, then :meth:`unpublished`: on PostgreSQL one statement
        (one round trip and one commit where the two took two of each)."""
        if not seqs:
            return await self.unpublished(limit)
        if self.db.is_sqlite:
            await self.mark_published(seqs)
            return await self.unpublished(limit)
        after, marked = self._published_through, max(self._marked, *seqs)
        params = (limit, list(seqs), _ms(), after)
        rows = await store_pg.fetch(self.db, store_pg.MARK_THEN_UNPUBLISHED, params)
        return self._read_from(after, marked, [_stored_of(r) for r in rows])

    async def undelivered_to_ledger(self, limit: int = 100) -> list[StoredEvent]:
        """The oldest rows not yet in the ledger, in commit order (``published`` is JetStream's)."""
        rows = await self._all(
            select(outbox).where(outbox.c.ledger_at.is_(None)).order_by(outbox.c.seq).limit(limit)
        )
        return [_stored(r) for r in rows]

    async def mark_delivered_to_ledger(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        async with self.db.transaction() as conn:
            await conn.execute(
                update(outbox)
                .where(and_(outbox.c.seq.in_(list(seqs)), outbox.c.ledger_at.is_(None)))
                .values(ledger_at=_ms())
            )


ORDER_FIELDS = ("account", "instrument", "side", "quantity", "amount", "currency")
#: How many committed events a store keeps for the hand-off of its process (``keep_committed``).
KEPT_COMMITTED = 1024
#: How many trades a store keeps as it last read or moved them (:meth:`TradeStore.last_known`).
KEPT_TRADES = 4096
#: The trade fields a transition's ``updates`` set, as :class:`Trade` holds them.
_MOVED_FIELDS = frozenset({"allocation", "proposer", "settlement"})


#: The trade columns a transition of PostgreSQL's one-statement path may set (``store_pg``).
_ONE_STATEMENT_UPDATES: tuple[frozenset[str], ...] = (
    frozenset(),
    frozenset({"allocation", "proposer"}),
    frozenset({"settlement"}),
)


def _answer_params(key: Key, result: Any) -> tuple[Any, ...]:
    """The Idempotency-Key parameters of ``store_pg``'s transition function: the key's scope,
    fingerprint, token, expiry and the answer ``result`` makes (all None without a
    :class:`KeyedAnswer`: the key is only recorded on the transition)."""
    if not isinstance(key, KeyedAnswer):
        return (None,) * 8
    pending, answer = key.pending, key.render(result)
    return (
        pending.scope, pending.fingerprint, pending.token, _ms(pending.expires_at),
        answer.status, answer.body, answer.content_type, answer.location,
    )  # fmt: skip


def _one_statement(
    db: Database,
    updates: Mapping[str, Any] | None,
    *others: object,
) -> bool:
    """Whether :meth:`TradeStore.apply` runs as one statement (``store_pg``): on PostgreSQL, for a
    transition that opens no exception, closes none and records no signal (the service's steps);
    the others keep their transaction."""
    return (
        not db.is_sqlite
        and all(other is None for other in others)
        and frozenset(updates or {}) in _ONE_STATEMENT_UPDATES
    )


def _learning(
    claims: Mapping[str, Any],
    jws: str,
    now: float,
    cursor: tuple[str, int] | None,
    feeds: bool,
) -> tuple[Any, ...]:
    """The parameters of PostgreSQL's learning function (``store_pg``): what
    :meth:`TradeStore._apply_learned` and :meth:`TradeStore._learn_one` compute from the claims,
    in the same way; ``feeds``: the inbox keeps the signed event of one applied on arrival
    (:func:`_free_inbox_jws`)."""
    name, target, source = claims["transition"], claims.get("state"), claims.get("from")
    event_type = claims.get("type")
    raw_data, raw_envelope = claims.get("data"), claims.get("envelope")
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    envelope: dict[str, Any] = raw_envelope if isinstance(raw_envelope, dict) else {}
    mode = "move"
    order, txn, envelope_json = None, None, None
    if event_type == "exception.escalated":
        mode = "escalated"
    elif name == "create":
        mode = "create"
        order = [str(data.get(f, ""))[:64] for f in ORDER_FIELDS]
        raw_txn = envelope.get("txn")
        txn = raw_txn[:256] if isinstance(raw_txn, str) else None
        envelope_json = orjson.dumps(envelope).decode()
    sets, allocation, proposer, settlement = None, None, None, None
    if event_type == "allocation.proposed":
        who = envelope.get("sub") or envelope.get("client_id")
        sets, allocation = "allocation", orjson.dumps(data.get("allocations")).decode()
        proposer = str(who)[:256] if who is not None else None
    elif event_type in ("settlement.submitted", "settlement.amended"):
        sets, settlement = "settlement", orjson.dumps(data.get("instructions")).decode()
    elif event_type == "settlement.exception":
        sets = "exception"
    acting = Acting.from_event(claims)
    return (
        str(claims["jti"]), str(claims["trade_id"]), str(name),
        source if isinstance(source, str) else None, target if isinstance(target, str) else None,
        mode, order, txn, envelope_json, sets, allocation, proposer, settlement,
        f"event:{claims.get('iss')}"[:256], acting.token_iss, acting.token_jti, acting.mandate_id,
        str(claims.get("iss"))[:512], str(claims.get("type"))[:64], jws, _ms(now),
        cursor[0] if cursor else None, cursor[1] if cursor else 0, APPEND_LOCKS["ref_inbox"],
        feeds,
    )  # fmt: skip


def payload_of(jws: str) -> dict[str, Any]:
    """The payload of a JWS this store verified before keeping it (its inbox), or that a store of
    this process signed (the hand-off from memory)."""
    part = jws.split(".")[1]
    value = orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return value if isinstance(value, dict) else {}


def _add_ledger_column(conn: Any) -> None:
    """A store created before the ledger marker gets its column (its index: :func:`_upgrade_indexes`);
    rows stay undelivered."""
    if "ledger_at" in {c["name"] for c in inspect(conn).get_columns("ref_outbox")}:
        return
    conn.execute(text("ALTER TABLE ref_outbox ADD COLUMN ledger_at BIGINT"))


#: The outbox's pages are filled to this percentage by inserts (PostgreSQL; ``create_schema`` sets
#: it on a store made before, for its pages to come): the rest is room for the publisher's mark,
#: a new version of the row (~1.5 kB, its signed event) that PostgreSQL writes in place (HOT: no
#: index entry) only when it fits on the row's page. Full pages, the mark moved the row to another
#: page and wrote an entry in each index.
OUTBOX_FILLFACTOR = 50

#: Indexes of stores made before 2026-12-06 that no query needs (dropped by ``create_schema``): the
#: outbox's by trade and by txn, and the inbox's by trade and by ``applied_at`` (replaced by
#: :data:`KEPT_INDEX`); the outbox's full indexes on ``published_at`` and ``ledger_at`` (replaced
#: by :data:`UNPUBLISHED_INDEX` and :data:`UNDELIVERED_INDEX`).
UNUSED_INDEXES = (
    "ix_ref_outbox_trade_id",
    "ix_ref_outbox_txn",
    "ix_ref_inbox_trade_id",
    "ix_ref_inbox_applied_at",
    "ix_ref_outbox_published_at",
    "ix_ref_outbox_ledger_at",
    # the rows not yet published, by ``seq`` (partial): the publisher reads from its position by
    # the primary key since (its predicate on ``published_at`` made every mark a non-HOT update)
    "ix_ref_outbox_unpublished",
)
#: The partial indexes a store made before them gets (checked first: a no-op once they exist).
PARTIAL_INDEXES = (KEPT_INDEX, UNDELIVERED_INDEX)


#: The outbox's unique index on ``event_id`` of stores made before (PostgreSQL's name for the
#: constraint ``unique=True`` made): dropped by ``create_schema``. SQLite's, part of the table's
#: definition, stays (dropping it would mean copying the table).
OUTBOX_EVENT_ID_KEY = "ref_outbox_event_id_key"


#: The inbox's primary key on ``seq`` (``create_all``'s): read only by the reporting service's feed
#: (``feed_after``: ``seq > n ORDER BY seq``), kept in the reporting store (and a store shared by
#: all services). The other stores learn by ``event_id`` (its unique index) and find their kept
#: events by :data:`KEPT_INDEX`: an entry per learned event that nothing read (6 per lifecycle
#: over the execution, allocation and settlement stores), dropped there by ``create_schema``
#: (PostgreSQL; ``seq`` keeps its numbers, from its sequence). SQLite's ``seq`` is the rowid.
INBOX_KEY = "ref_inbox_pkey"


def _key_inbox(sync_conn: Any, feed: bool) -> None:
    """PostgreSQL: the inbox's :data:`INBOX_KEY` made where ``feed`` (the reporting store's, or a
    shared one) and dropped elsewhere; a no-op once so."""
    keyed = sync_conn.execute(
        text(
            "SELECT 1 FROM pg_constraint WHERE conrelid = 'ref_inbox'::regclass "
            "AND contype = 'p' AND conname = :name"
        ),
        {"name": INBOX_KEY},
    ).first()
    if feed and keyed is None:
        sync_conn.execute(
            text(f"ALTER TABLE ref_inbox ADD CONSTRAINT {INBOX_KEY} PRIMARY KEY (seq)")
        )
    elif not feed and keyed is not None:
        sync_conn.execute(text(f"ALTER TABLE ref_inbox DROP CONSTRAINT {INBOX_KEY}"))


def _free_inbox_jws(sync_conn: Any) -> None:
    """PostgreSQL: the inbox's ``jws`` made nullable in a store made before (a no-op once so:
    looked up first, so that a current store takes no table lock).

    The inbox rows of a store that serves no feed (execution, allocation, settlement:
    :attr:`TradeStore.feeds`) hold the signed event only while it waits for its predecessor
    (:meth:`TradeStore._retry_pending` reads it then); an event applied on arrival (nearly all)
    is recorded by its id, issuer, type, trade and transition, and by its transition row (actor
    ``event:<iss>``, the event id), without it: nothing of such a store reads it again (its one
    reader is the reporting feed, :meth:`TradeStore.feed_after`), and it was most of the store's
    WAL per learned event. The signed event stays in its owner's outbox, in JetStream and in the
    reporting store. SQLite keeps it (the column is ``NOT NULL`` in stores made before)."""
    required = sync_conn.execute(
        text(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'ref_inbox'::regclass "
            "AND attname = 'jws'"
        )
    ).scalar()
    if required:
        sync_conn.execute(text("ALTER TABLE ref_inbox ALTER COLUMN jws DROP NOT NULL"))


def _order_trades(sync_conn: Any) -> None:
    """PostgreSQL: a ``ref_trades`` whose columns are not in :data:`trades`' order (a store made
    before: the envelope after ``state``) is made anew in it, its rows copied, in the schema's
    transaction (under its lock); a no-op once done."""
    present = [
        str(r[0])
        for r in sync_conn.execute(
            text(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'ref_trades'::regclass "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            )
        )
    ]
    if present == list(trades.c.keys()):
        return
    sync_conn.execute(text("ALTER TABLE ref_trades RENAME TO ref_trades_before"))
    sync_conn.execute(
        text(
            "ALTER TABLE ref_trades_before RENAME CONSTRAINT ref_trades_pkey TO ref_trades_before_pkey"
        )
    )
    trades.create(sync_conn)
    columns = ", ".join(trades.c.keys())
    sync_conn.execute(
        text(f"INSERT INTO ref_trades ({columns}) SELECT {columns} FROM ref_trades_before")  # noqa: S608 - constants
    )
    sync_conn.execute(text("DROP TABLE ref_trades_before"))


def _fill_outbox(sync_conn: Any) -> None:
    """PostgreSQL: the outbox's :data:`OUTBOX_FILLFACTOR` (a no-op once set)."""
    options = sync_conn.execute(
        text("SELECT reloptions FROM pg_class WHERE oid = 'ref_outbox'::regclass")
    ).scalar()
    if f"fillfactor={OUTBOX_FILLFACTOR}" not in (options or []):
        sync_conn.execute(text(f"ALTER TABLE ref_outbox SET (fillfactor = {OUTBOX_FILLFACTOR})"))


def _key_transitions_by_step(sync_conn: Any) -> None:
    """PostgreSQL: ``ref_transitions``' primary key on ``id`` (``create_all``'s, or a store made
    before) replaced by the step's unique constraint promoted (:data:`TRANSITION_KEY`); the
    outbox's :data:`OUTBOX_EVENT_ID_KEY` dropped. A no-op once done."""
    keyed = sync_conn.execute(
        text(
            "SELECT 1 FROM pg_constraint WHERE conrelid = 'ref_transitions'::regclass "
            "AND contype = 'p' AND conname = :name"
        ),
        {"name": TRANSITION_KEY},
    ).first()
    if keyed is None:
        sync_conn.execute(
            text(
                "ALTER TABLE ref_transitions DROP CONSTRAINT IF EXISTS ref_transitions_pkey, "
                f"DROP CONSTRAINT IF EXISTS {TRANSITION_KEY}, "
                f"ADD CONSTRAINT {TRANSITION_KEY} PRIMARY KEY (trade_id, transition)"
            )
        )
    sync_conn.execute(
        text(f"ALTER TABLE ref_outbox DROP CONSTRAINT IF EXISTS {OUTBOX_EVENT_ID_KEY}")
    )


def _upgrade_indexes(sync_conn: Any, resting: bool) -> None:
    """A store made before :data:`PARTIAL_INDEXES` gets them (the inbox's kept events, the outbox's
    rows not yet published or in the ledger are found by them) and loses :data:`UNUSED_INDEXES`;
    the :data:`RESTING_INDEXES` are made where ``resting`` (the settlement's store) and dropped
    elsewhere; on PostgreSQL the transitions are keyed by their step
    (:func:`_key_transitions_by_step`); a no-op on a current store (``IF [NOT] EXISTS``)."""
    if sync_conn.dialect.name == "postgresql":
        _key_transitions_by_step(sync_conn)
        _fill_outbox(sync_conn)
        _order_trades(sync_conn)
    for index in PARTIAL_INDEXES:
        index.create(sync_conn, checkfirst=True)
    for name, column in RESTING_INDEXES.items():
        sync_conn.execute(
            text(f"CREATE INDEX IF NOT EXISTS {name} ON ref_transitions ({column})")
            if resting
            else text(f"DROP INDEX IF EXISTS {name}")
        )
    for name in UNUSED_INDEXES:
        sync_conn.execute(text(f"DROP INDEX IF EXISTS {name}"))


class _Lost(Exception):
    """The compare-and-set matched no row: find out why after the rollback."""


def _add_acting_columns(sync_conn: Any) -> None:
    """A ``ref_transitions`` made before the acting-token columns gets them (nullable: the older
    transitions rest on no recorded token)."""
    present = {c["name"] for c in inspect(sync_conn).get_columns("ref_transitions")}
    for name in ACTING_COLUMNS:
        if name not in present:
            column = transitions.c[name]
            kind = column.type.compile(dialect=sync_conn.dialect)
            # PostgreSQL: two services upgrading at once must not fail (SQLite has one writer)
            guard = "IF NOT EXISTS " if sync_conn.dialect.name == "postgresql" else ""
            sync_conn.execute(text(f"ALTER TABLE ref_transitions ADD COLUMN {guard}{name} {kind}"))


def _stored(row: Any) -> StoredEvent:
    return _stored_of(row._mapping)


def _stored_of(m: Mapping[str, Any]) -> StoredEvent:
    return StoredEvent(
        m["seq"],
        m["event_id"],
        m["type"],
        m["trade_id"],
        m["jws"],
        m["published_at"] is not None,
        m["created_at"] / 1000,
    )
