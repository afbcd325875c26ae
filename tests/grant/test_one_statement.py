"""PostgreSQL: a batch of token requests whose every condition is a fresh ``jti`` is one statement
on the writer's autocommit connection (the ``jti`` upsert, the decisions' inputs and the ledger's
pending rows together, no ``BEGIN``/``COMMIT``); a batch with a replayed ``jti`` writes nothing that
way and records, the transactional way, exactly what :func:`record_batch` records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit import sink
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.errors import InvalidClientError, OAuth2Error
from trustplane.grant.outcomes import (
    ConsumeJti,
    Outcome,
    OutcomeRecorder,
    record_alone,
    record_batch,
)
from trustplane.policy.recorder import DecisionRecord
from trustplane.protocol.replay import ReplayUse
from trustplane.ssf.receiver import Derivations
from trustplane.storage.db import Database
from trustplane.storage.driver_sql import VALUES_ROWS
from trustplane.storage.writer import GroupCommitWriter, WriterUnavailable

pytestmark = pytest.mark.postgres
ISSUER = "http://127.0.0.1:8000"
Rows = tuple[list[tuple[Any, ...]], ...]


def _wire(db: Database) -> list[str]:
    """The first word of every statement sent from now on on the autocommit engine (the writer's):
    SQLAlchemy's, and those sent straight to asyncpg (its query logger: ``BEGIN``, ``COMMIT``, the
    statements of ``driver.execute``). The logger's calls are scheduled on the loop, so the two
    kinds may interleave out of order: compare counts, not order."""
    sent: list[str] = []

    def log(query: str) -> None:
        if "typeinfo_tree" in query or "set_config('jit'" in query:
            return  # asyncpg's look-up of a type (an array's) once per connection, and its JIT off/on
        sent.append(query.split()[0].upper().rstrip(";"))

    def connected(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.driver_connection.add_query_logger(lambda record: log(record.query))

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        log(statement)

    engine = db.autocommit_engine.sync_engine
    event.listen(engine, "connect", connected)
    event.listen(engine, "before_cursor_execute", executed)
    return sent


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = Database(pg_url)
    yield database
    await database.dispose()


@pytest.fixture
def observed() -> Iterator[Any]:
    """The SSF derivation index registered as the server registers it (ssf/wiring.py)."""
    observer = Derivations(ISSUER).observe
    sink.OBSERVERS.append(observer)
    yield observer
    sink.OBSERVERS.remove(observer)


async def _writer(db: Database) -> GroupCommitWriter:
    writer = GroupCommitWriter(db)
    OutcomeRecorder(writer)
    writer.start()
    return writer


async def _counted(db: Database) -> tuple[GroupCommitWriter, list[str]]:
    """A writer whose connection is open and whose statements are prepared (one request
    recorded), and the statements it sends from now on."""
    sent = _wire(db)
    writer = await _writer(db)
    await writer.submit("token_outcome", _outcomes(["warm"])[0])
    sent.clear()
    return writer, sent


def _issued(i: int, payload: dict[str, Any] | None = None) -> AuditEvent:
    return AuditEvent(
        type=AuditEventType.TOKEN_ISSUED,
        issuer=ISSUER,
        client_id="c",
        jti=f"t{i}",
        decision="allow",
        payload=payload,
    )


def _refusal(i: int) -> Callable[[OAuth2Error], AuditEvent]:
    """The same refusal record whenever it is asked for (so two runs can be compared)."""
    refusal = AuditEvent(
        type=AuditEventType.TOKEN_REFUSED,
        issuer=ISSUER,
        client_id="c",
        jti=f"r{i}",
        decision="deny",
        reason="invalid_client",
    )
    return lambda _error: refusal


def _decision(i: int, bundle: str = "b1") -> DecisionRecord:
    allowed = AuditEvent(
        type=AuditEventType.POLICY_DECISION_ALLOWED,
        issuer=ISSUER,
        client_id="c",
        decision="allow",
        policy_bundle_version=bundle,
    )
    return DecisionRecord(allowed, "token:obtain", f"res-{i}", 7, f'{{"i": {i}}}')


def _outcomes(jtis: Sequence[str], *, bundle: str = "b1") -> list[Outcome]:
    return [
        Outcome(
            event=_issued(i),
            refused=_refusal(i),
            conditions=(ConsumeJti(ReplayUse("client-a", jti, 2**40), InvalidClientError()),),
            decisions=(_decision(i, bundle),),
        )
        for i, jti in enumerate(jtis)
    ]


async def _written(conn: AsyncConnection) -> Rows:
    async def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in (await conn.exec_driver_sql(sql)).all()]

    pending = []
    for entry, payload in await rows("SELECT entry, payload FROM audit_pending ORDER BY id"):
        body = orjson.loads(entry)
        del body["payload_hash"]  # salted: differs between two appends of one event
        pending.append((body["type"], body, payload))
    return (
        pending,
        await rows("SELECT * FROM policy_decisions ORDER BY decision_id"),
        await rows("SELECT issuer, jti, expires_at FROM used_jtis ORDER BY issuer, jti"),
        await rows("SELECT jti, origin_iss, origin_sub FROM ssf_derivations ORDER BY jti"),
    )


async def _stored(db: Database) -> Rows:
    async with db.read() as conn:
        return await _written(conn)


class _Abort(Exception):
    pass


async def _reference(db: Database, outcomes: Sequence[Outcome]) -> tuple[list[Any], Rows]:
    """What the transactional path (the code before the single statement) answers and leaves in
    the tables for ``outcomes``, on the database as it is now; rolled back afterwards."""
    try:
        async with db.transaction() as conn:
            failed = await record_batch(conn, outcomes)
            written = await _written(conn)
            raise _Abort
    except _Abort:
        pass
    return failed, written


async def _use(db: Database, jti: str) -> None:
    async with db.transaction() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO used_jtis (issuer, jti, expires_at) VALUES ($1, $2, $3)",
            ("client-a", jti, 2**40),
        )


async def test_a_batch_of_fresh_token_requests_is_one_statement(
    db: Database, observed: Any
) -> None:
    """Fails on the old code: four statements (``BEGIN``, the upsert, the ledger insert,
    ``COMMIT``)."""
    writer, sent = await _counted(db)
    try:
        outcomes = _outcomes([f"j{i}" for i in range(8)])
        expected, reference = await _reference(db, outcomes)
        batches = writer.batches

        failed = await asyncio.gather(*(writer.submit("token_outcome", o) for o in outcomes))

        assert writer.batches == batches + 1  # the eight shared one batch
        assert sent == ["WITH"]
        assert failed == expected == [None] * 8
    finally:
        await writer.stop()
    assert await _stored(db) == reference
    assert reference[3] == []  # the observer had nothing to index


@pytest.mark.parametrize("n", [1, 2, VALUES_ROWS // 2, VALUES_ROWS // 2 + 1, VALUES_ROWS + 1, 60])
async def test_a_batch_binds_scalars_up_to_the_bound_and_writes_what_the_transaction_writes(
    db: Database, observed: Any, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """Each insert of the statement (the decisions' n rows, the ledger's 2n, the claim's n) binds
    a scalar per value up to ``VALUES_ROWS`` rows, an array per column above; the rows written,
    the ledger's in order, are those of the transactional path. Fails on the old code for every
    n: arrays only."""
    sent: list[tuple[Any, ...]] = []
    original = asyncpg.Connection.execute

    async def on_the_driver(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> str:
        sent.append(args)
        return await original(self, query, *args, **kw)  # type: ignore[no-any-return]

    outcomes = _outcomes([f"j{i:03}" for i in range(n)])
    expected, reference = await _reference(db, outcomes)
    monkeypatch.setattr(asyncpg.Connection, "execute", on_the_driver)
    async with db.autocommit_engine.connect() as conn:
        assert await record_alone(conn, outcomes) == expected == [None] * n
    monkeypatch.undo()

    (args,) = sent
    arrays = [len(a) for a in args if isinstance(a, list)]
    inputs = [n] * 11 if n > VALUES_ROWS else []
    pending = [2 * n] * 10 if 2 * n > VALUES_ROWS else []
    claim = [n] * 3 if n > VALUES_ROWS else []
    assert arrays == inputs + pending + claim
    scalars = (11 + 3) * n * (n <= VALUES_ROWS) + 20 * n * (2 * n <= VALUES_ROWS)
    assert len(args) - len(arrays) == scalars
    assert await _stored(db) == reference


async def test_a_replayed_jti_is_refused_and_the_batch_records_what_the_transaction_records(
    db: Database, observed: Any
) -> None:
    """The statement wrote nothing (it failed on purpose), then the batch ran the transactional
    way: the replay answers its condition, the others are issued, the ledger's pending rows, the
    decisions and the claimed jtis are those of :func:`record_batch`."""
    await _use(db, "j2")
    writer, sent = await _counted(db)
    outcomes = _outcomes(["j0", "j1", "j2", "j3"])
    expected, reference = await _reference(db, outcomes)
    try:
        failed = await asyncio.gather(*(writer.submit("token_outcome", o) for o in outcomes))
    finally:
        await writer.stop()

    assert failed == expected == [None, None, outcomes[2].conditions[0], None]
    # the failed statement, then BEGIN, the upsert with the inputs, the ledger insert, COMMIT
    assert sorted(sent) == sorted(["WITH", "BEGIN", "WITH", "INSERT", "COMMIT"])
    assert await _stored(db) == reference
    types = [kind for kind, _, _ in reference[0]]
    issued, refused = types.count("oauth:token:issued"), types.count("oauth:token:refused")
    assert (issued, refused) == (1 + 3, 1)  # the warm-up's issuance, then this batch


async def test_a_failure_mid_statement_leaves_nothing_written(db: Database) -> None:
    """A decision row the table refuses (a bundle version longer than its column) fails the
    statement after the upsert and the ledger insert have run in it: nothing of any is kept."""
    outcomes = _outcomes(["j0", "j1"], bundle="v" * 65)
    async with db.autocommit_engine.connect() as conn:
        with pytest.raises(Exception, match="too long"):
            await record_alone(conn, outcomes)

    assert await _stored(db) == ([], [], [], [])


async def test_a_poison_request_fails_alone_and_its_batch_mates_are_issued(db: Database) -> None:
    writer = await _writer(db)
    outcomes = [*_outcomes(["j0", "j1"]), *_outcomes(["j2"], bundle="v" * 65)]
    try:
        results = await asyncio.gather(
            *(writer.submit("token_outcome", o) for o in outcomes), return_exceptions=True
        )
    finally:
        await writer.stop()

    assert results[:2] == [None, None]
    assert isinstance(results[2], WriterUnavailable)
    pending, decisions, used, _ = await _stored(db)
    assert [jti for _, jti, _ in used] == ["j0", "j1"]
    assert (len(pending), len(decisions)) == (4, 2)


async def test_rows_the_derivation_index_writes_for_ride_in_the_statement(
    db: Database, observed: Any
) -> None:
    """A token issued from a partner's assertion (a jwt-bearer grant: only fresh jtis as
    conditions) is indexed by the SSF observer in the batch's one statement. Fails on the old
    code: ``BEGIN``, the upsert, the ledger insert, the observer's insert, ``COMMIT``."""
    origin = {"origin": {"iss": "https://idp.example", "sub": "alice"}, "exp": 2**31}
    outcome = Outcome(
        event=_issued(0, origin),
        refused=_refusal(0),
        conditions=(ConsumeJti(ReplayUse("client-a", "j0", 2**40), InvalidClientError()),),
    )
    writer, sent = await _counted(db)
    try:
        assert await writer.submit("token_outcome", outcome) is None
    finally:
        await writer.stop()

    assert sent == ["WITH"]
    pending, _, used, derived = await _stored(db)
    assert (len(pending), len(used)) == (3, 2)  # the warm-up's issuance and decision too
    assert derived == [("t0", "https://idp.example", "alice")]


async def test_events_another_observer_writes_for_go_the_transactional_way(db: Database) -> None:
    """An observer that writes with the connection itself (no ``pg_insert``): the batch runs as a
    transaction, the observer's insert in it."""
    written: list[str] = []

    async def observer(conn: AsyncConnection, events: Sequence[AuditEvent]) -> None:
        for e in events:
            if e.jti == "t0":
                await conn.exec_driver_sql("SELECT 1")
                written.append(e.jti)

    outcome = _outcomes(["j0"])[0]
    writer, sent = await _counted(db)
    sink.OBSERVERS.append(observer)
    try:
        assert await writer.submit("token_outcome", outcome) is None
    finally:
        sink.OBSERVERS.remove(observer)
        await writer.stop()

    assert "BEGIN" in sent
    assert "COMMIT" in sent
    assert written == ["t0"]


async def test_of_two_workers_racing_with_one_jti_exactly_one_issues(pg_url: str) -> None:
    """Two writers (two worker processes' connections): both statements claim the jti, one waits
    for the other's commit, finds the row taken and fails, and its request is refused."""
    dbs = [Database(pg_url), Database(pg_url)]
    writers = [await _writer(d) for d in dbs]
    outcomes = [_outcomes(["same"])[0], _outcomes(["same"])[0]]
    try:
        results = await asyncio.gather(
            *(w.submit("token_outcome", o) for w, o in zip(writers, outcomes, strict=True))
        )
        for writer in writers:
            await writer.stop()
        pending, decisions, used, _ = await _stored(dbs[0])
    finally:
        for d in dbs:
            await d.dispose()

    assert sorted(r is None for r in results) == [False, True]
    assert sorted(kind for kind, _, _ in pending) == sorted(
        ["oauth:token:issued", "oauth:token:refused", *["policy:decision:allowed"] * 2]
    )
    assert (len(decisions), len(used)) == (2, 1)
