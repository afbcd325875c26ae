"""Idempotency keys, framework-free: the sf-string parser, the fingerprint, the SQL store contract and
the service (on SQLite and PostgreSQL), and racing claims."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from tests.pep.conftest import FakeClock
from trustplane.pep import (
    Claim,
    Execute,
    IdempotencyService,
    KeyReusedError,
    MalformedKeyError,
    MissingKeyError,
    Replay,
    RequestOutstandingError,
    SqlIdempotencyStore,
    StoredResponse,
    fingerprint,
    parse_key,
    serialize_key,
)
from trustplane.pep import idempotency as idempotency_module
from trustplane.storage.db import Database

LEASE, RETENTION = 60.0, 24 * 3600.0
SCOPE = "settlement:submit client-1"
PRINT = fingerprint("POST", "/settlements", b'{"amount": 1}')
OTHER_PRINT = fingerprint("POST", "/settlements", b'{"amount": 2}')
CREATED = StoredResponse(201, b'{"id": "S-1"}', "application/json", "/settlements/S-1")


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"a"', "a"),
        ('  "spaces around"  ', "spaces around"),
        ('"with \\"quotes\\""', 'with "quotes"'),
        ('"back\\\\slash"', "back\\slash"),
        ('" ~!#$%&()*+,-./:;<=>?@[]^_`{|}"', " ~!#$%&()*+,-./:;<=>?@[]^_`{|}"),
        ('"' + "x" * 255 + '"', "x" * 255),
    ],
)
def test_valid_key(value: str, key: str) -> None:
    assert parse_key(value) == key


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "quoted string"),
        ("", "quoted string"),
        ("?1", "quoted string"),
        (":YWJj:", "quoted string"),
        ("'single'", "quoted string"),
        ('"unterminated', "closing quote is missing"),
        ('"ends in escape\\"', "closing quote is missing"),
        ('"a\\nb"', "may be escaped"),
        ('"a\\u0041"', "may be escaped"),
        ('"caf\u00e9"', "printable ASCII"),
        ('"tab\there"', "printable ASCII"),
        ('"nul\x00"', "printable ASCII"),
        ('"abc";p=1', "after the closing quote"),
        ('"abc", "def"', "after the closing quote"),
        ('"abc"x', "after the closing quote"),
        ('""', "empty"),
        ('"' + "x" * 256 + '"', "longer than 255"),
        ('"' + "x" * 600 + '"', "longer than 255"),
    ],
)
def test_malformed_key(value: str, message: str) -> None:
    with pytest.raises(MalformedKeyError, match=message):
        parse_key(value)


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=255))
def test_any_printable_key_round_trips(key: str) -> None:
    assert parse_key(serialize_key(key)) == key


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "new\nline"])
def test_serialize_refuses_what_cannot_be_a_key(key: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        serialize_key(key)


def test_fingerprint_covers_method_path_and_body() -> None:
    base = fingerprint("POST", "/settlements", b"{}")
    assert base == fingerprint("post", "/settlements", b"{}")
    assert (
        len(
            {
                base,
                fingerprint("PUT", "/settlements", b"{}"),
                fingerprint("POST", "/settlements/x", b"{}"),
                fingerprint("POST", "/settlements", b"{ }"),
                fingerprint("POST", "/settlement", b"s{}"),  # no ambiguity between path and body
            }
        )
        == 5
    )


# --------------------------------------------------------------------------- store contract


def claim_of(key: str = "k1", fp: str = PRINT, token: str = "t1", scope: str = SCOPE) -> Claim:
    return Claim(scope, key, fp, token)


async def claim(store: SqlIdempotencyStore, c: Claim, now: float) -> bool:
    return await store.claim(c, now=now, lease_until=now + LEASE, expires_at=now + RETENTION)


async def test_store_claims_a_new_key_once(idempotency_store: SqlIdempotencyStore) -> None:
    first = claim_of()
    assert await claim(idempotency_store, first, 1000.0)
    assert not await claim(idempotency_store, claim_of(token="t2"), 1001.0)

    record = await idempotency_store.get(SCOPE, "k1")
    assert record is not None
    assert (record.fingerprint, record.response) == (PRINT, None)
    assert (record.lease_until, record.expires_at) == (1000.0 + LEASE, 1000.0 + RETENTION)
    assert await idempotency_store.get(SCOPE, "k2") is None


async def test_store_complete_then_get_returns_the_response(
    idempotency_store: SqlIdempotencyStore,
) -> None:
    first = claim_of()
    await claim(idempotency_store, first, 1000.0)

    assert not await idempotency_store.complete(claim_of(token="intruder"), CREATED)
    assert await idempotency_store.complete(first, CREATED)
    assert not await idempotency_store.complete(first, CREATED)  # no longer in progress

    record = await idempotency_store.get(SCOPE, "k1")
    assert record is not None
    assert record.response == CREATED


async def test_store_keeps_binary_bodies_and_absent_headers(
    idempotency_store: SqlIdempotencyStore,
) -> None:
    first = claim_of()
    await claim(idempotency_store, first, 1000.0)
    await idempotency_store.complete(first, StoredResponse(204, b""))
    await claim(idempotency_store, claim_of(key="k2"), 1000.0)
    await idempotency_store.complete(claim_of(key="k2"), StoredResponse(400, bytes(range(256))))

    assert (await idempotency_store.get(SCOPE, "k1")).response == StoredResponse(204, b"")  # type: ignore[union-attr]
    assert (await idempotency_store.get(SCOPE, "k2")).response.body == bytes(range(256))  # type: ignore[union-attr]


async def test_store_release_makes_the_key_new(idempotency_store: SqlIdempotencyStore) -> None:
    first = claim_of()
    await claim(idempotency_store, first, 1000.0)

    assert not await idempotency_store.release(claim_of(token="intruder"))
    assert await idempotency_store.release(first)
    assert await idempotency_store.get(SCOPE, "k1") is None
    assert await claim(idempotency_store, claim_of(fp=OTHER_PRINT, token="t2"), 1001.0)


async def test_store_release_leaves_a_completed_key(idempotency_store: SqlIdempotencyStore) -> None:
    first = claim_of()
    await claim(idempotency_store, first, 1000.0)
    await idempotency_store.complete(first, CREATED)

    assert not await idempotency_store.release(first)
    assert await idempotency_store.get(SCOPE, "k1") is not None


async def test_store_takes_over_an_abandoned_claim_after_its_lease(
    idempotency_store: SqlIdempotencyStore,
) -> None:
    crashed, retry = claim_of(token="crashed"), claim_of(token="retry")
    await claim(idempotency_store, crashed, 1000.0)

    assert not await claim(idempotency_store, retry, 1000.0 + LEASE - 0.01)
    assert not await claim(idempotency_store, claim_of(fp=OTHER_PRINT), 1000.0 + LEASE)
    assert await claim(idempotency_store, retry, 1000.0 + LEASE)

    assert not await idempotency_store.complete(crashed, CREATED)  # the old owner lost it
    assert not await idempotency_store.release(crashed)
    assert await idempotency_store.complete(retry, CREATED)


async def test_store_never_takes_over_a_completed_key_before_expiry(
    idempotency_store: SqlIdempotencyStore,
) -> None:
    first = claim_of()
    await claim(idempotency_store, first, 1000.0)
    await idempotency_store.complete(first, CREATED)

    assert not await claim(idempotency_store, claim_of(token="t2"), 1000.0 + RETENTION - 1)
    assert await claim(idempotency_store, claim_of(fp=OTHER_PRINT, token="t2"), 1000.0 + RETENTION)

    record = await idempotency_store.get(SCOPE, "k1")
    assert record is not None
    assert (record.fingerprint, record.response) == (OTHER_PRINT, None)


async def test_store_purge_deletes_expired_keys(idempotency_store: SqlIdempotencyStore) -> None:
    for key, at in [("old", 1000.0), ("older", 500.0), ("fresh", 5000.0)]:
        await claim(idempotency_store, claim_of(key=key), at)
    await idempotency_store.complete(claim_of(key="old"), CREATED)

    assert await idempotency_store.purge(1000.0 + RETENTION) == 2
    assert await idempotency_store.get(SCOPE, "old") is None
    assert await idempotency_store.get(SCOPE, "older") is None
    assert await idempotency_store.get(SCOPE, "fresh") is not None
    assert await idempotency_store.purge(1000.0 + RETENTION) == 0


async def test_store_scopes_are_isolated(idempotency_store: SqlIdempotencyStore) -> None:
    mine, theirs = claim_of(), claim_of(scope="settlement:submit client-2", fp=OTHER_PRINT)
    assert await claim(idempotency_store, mine, 1000.0)
    assert await claim(idempotency_store, theirs, 1000.0)
    await idempotency_store.complete(mine, CREATED)

    other = await idempotency_store.get("settlement:submit client-2", "k1")
    assert other is not None
    assert (other.fingerprint, other.response) == (OTHER_PRINT, None)


# --------------------------------------------------------------------------- service


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(idempotency_store: SqlIdempotencyStore, clock: FakeClock) -> IdempotencyService:
    return IdempotencyService(idempotency_store, lease=LEASE, retention=RETENTION, clock=clock)


def counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value("trustplane_pep_idempotency_total", {"outcome": outcome})
    return value or 0.0


async def test_service_executes_then_replays(service: IdempotencyService) -> None:
    before = counted("executed"), counted("replayed")
    first = await service.begin(SCOPE, ['"k1"'], PRINT)
    assert isinstance(first, Execute)
    assert await service.complete(first.claim, CREATED)

    assert await service.begin(SCOPE, ['"k1"'], PRINT) == Replay(CREATED)
    assert (counted("executed"), counted("replayed")) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize(
    ("headers", "error", "outcome"),
    [
        ([], MissingKeyError, "missing"),
        (["k1"], MalformedKeyError, "malformed"),
        (['"k1"', '"k2"'], MalformedKeyError, "malformed"),
    ],
)
async def test_service_refuses_a_missing_or_malformed_key(
    service: IdempotencyService, headers: list[str], error: type[Exception], outcome: str
) -> None:
    before = counted(outcome)
    with pytest.raises(error):
        await service.begin(SCOPE, headers, PRINT)
    assert counted(outcome) == before + 1


async def test_service_refuses_another_payload_and_an_outstanding_request(
    service: IdempotencyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs: list[dict[str, Any]] = []

    class Recorder:
        def info(self, event: str, **fields: Any) -> None:
            logs.append({"event": event, **fields})

    # The module's logger may be a cached structlog logger (configured by another test's app), so
    # structlog's capture_logs() cannot see it: replace it for this test.
    monkeypatch.setattr(idempotency_module, "log", Recorder())
    before = counted("in_progress"), counted("mismatch")
    first = await service.begin(SCOPE, ['"k1"'], PRINT)
    with pytest.raises(RequestOutstandingError):
        await service.begin(SCOPE, ['"k1"'], PRINT)
    with pytest.raises(KeyReusedError):
        await service.begin(SCOPE, ['"k1"'], OTHER_PRINT)
    assert (counted("in_progress"), counted("mismatch")) == (before[0] + 1, before[1] + 1)
    assert [(e["event"], e["outcome"], e["scope"], e["key"]) for e in logs] == [
        ("pep_idempotency_refused", "in_progress", SCOPE, "k1"),
        ("pep_idempotency_refused", "mismatch", SCOPE, "k1"),
    ]

    assert isinstance(first, Execute)
    await service.complete(first.claim, CREATED)
    with pytest.raises(KeyReusedError):
        await service.begin(SCOPE, ['"k1"'], OTHER_PRINT)


@pytest.mark.parametrize(
    ("status", "stored"), [(201, True), (404, True), (500, False), (503, False)]
)
async def test_service_stores_deterministic_outcomes_only(
    service: IdempotencyService, status: int, stored: bool
) -> None:
    first = await service.begin(SCOPE, ['"k1"'], PRINT)
    assert isinstance(first, Execute)
    assert await service.complete(first.claim, StoredResponse(status, b"{}")) is stored

    again = await service.begin(SCOPE, ['"k1"'], PRINT)
    assert isinstance(again, Replay if stored else Execute)


async def test_service_release_lets_a_retry_execute(service: IdempotencyService) -> None:
    before = counted("released")
    first = await service.begin(SCOPE, ['"k1"'], PRINT)
    assert isinstance(first, Execute)
    await service.release(first.claim)

    assert isinstance(await service.begin(SCOPE, ['"k1"'], PRINT), Execute)
    assert counted("released") == before + 1


async def test_service_lease_and_retention(service: IdempotencyService, clock: FakeClock) -> None:
    crashed = await service.begin(SCOPE, ['"k1"'], PRINT)
    clock.advance(LEASE)
    retry = await service.begin(SCOPE, ['"k1"'], PRINT)
    assert isinstance(crashed, Execute)
    assert isinstance(retry, Execute)
    assert not await service.complete(crashed.claim, CREATED)
    assert await service.complete(retry.claim, CREATED)

    clock.advance(RETENTION - 1)
    assert isinstance(await service.begin(SCOPE, ['"k1"'], PRINT), Replay)
    clock.advance(LEASE)  # retention counts from the (retry's) claim
    assert isinstance(await service.begin(SCOPE, ['"k1"'], OTHER_PRINT), Execute)


async def test_service_purge(service: IdempotencyService, clock: FakeClock) -> None:
    await service.begin(SCOPE, ['"k1"'], PRINT)
    clock.advance(RETENTION)
    await service.begin(SCOPE, ['"k2"'], PRINT)

    assert await service.purge() == 1
    assert await service.store.get(SCOPE, "k2") is not None


def test_service_refuses_a_lease_longer_than_retention(
    idempotency_store: SqlIdempotencyStore,
) -> None:
    with pytest.raises(ValueError, match="lease"):
        IdempotencyService(idempotency_store, lease=10, retention=5)


# --------------------------------------------------------------------------- races


async def race(service: IdempotencyService, n: int = 16) -> list[object]:
    return await asyncio.gather(
        *(service.begin(SCOPE, ['"k1"'], PRINT) for _ in range(n)), return_exceptions=True
    )


async def test_racing_claims_execute_once_then_replay(service: IdempotencyService) -> None:
    outcomes = await race(service)

    executed = [o for o in outcomes if isinstance(o, Execute)]
    assert len(executed) == 1
    assert all(isinstance(o, RequestOutstandingError) for o in outcomes if o is not executed[0])
    await service.complete(executed[0].claim, CREATED)
    assert await race(service) == [Replay(CREATED)] * 16


async def test_racing_takeovers_of_an_abandoned_claim_execute_once(
    service: IdempotencyService, clock: FakeClock
) -> None:
    await service.begin(SCOPE, ['"k1"'], PRINT)
    clock.advance(LEASE)

    outcomes = await race(service)
    assert sum(isinstance(o, Execute) for o in outcomes) == 1
    assert sum(isinstance(o, RequestOutstandingError) for o in outcomes) == 15


@pytest.mark.postgres
async def test_store_retries_once_on_a_dropped_connection(pg_database: str) -> None:
    """The store's connections are not pre-pinged: a pooled connection the server dropped fails
    the first try, and the statement runs again on a fresh one."""
    database = Database(pg_database)
    store = SqlIdempotencyStore(database)
    await store.create_schema()
    try:
        assert await store.get(SCOPE, "dropped") is None  # one pooled connection now
        async with database.transaction() as conn:
            await conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert await claim(store, claim_of(key="dropped"), 1000.0)
        assert await store.get(SCOPE, "dropped") is not None
    finally:
        await database.dispose()


async def test_sqlite_store_reads_through_its_thread_when_the_inline_read_would_wait(
    tmp_path: Path,
) -> None:
    """A SQLite read runs on the calling thread and never waits for a lock; when it would (e.g.
    during WAL recovery), it goes through the connection's thread instead."""

    class Busy:
        def execute(self, *_args: Any) -> Any:
            raise sqlite3.OperationalError("database is locked")

    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}")
    store = SqlIdempotencyStore(database)
    await store.create_schema()
    try:
        await claim(store, claim_of(), 1000.0)
        assert store._read_inline((SCOPE, "k1")) is not None
        store._reader = Busy()  # type: ignore[assignment]
        assert (await store.get(SCOPE, "k1")) is not None
    finally:
        await database.dispose()


async def test_sqlite_group_commit_fails_a_failing_write_alone(tmp_path: Path) -> None:
    """SQLite writes that arrive together share a transaction; when it fails, each write runs
    alone, so the others still commit."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'group.db'}")
    store = SqlIdempotencyStore(database)
    await store.create_schema()
    assert store._writes is not None
    broken = store._writes.write("UPDATE pep_idempotency_keys SET state = ?", ())  # no parameter
    try:
        outcomes = await asyncio.gather(
            *(claim(store, claim_of(key=f"k{i}"), 1000.0) for i in range(8)),
            broken,
            return_exceptions=True,
        )
        assert outcomes[:8] == [True] * 8
        assert isinstance(outcomes[8], sqlite3.ProgrammingError)
        assert all([await store.get(SCOPE, f"k{i}") for i in range(8)])
    finally:
        await database.dispose()


async def test_a_new_key_is_claimed_without_a_read_where_reads_cost_a_round_trip(
    idempotency_store: SqlIdempotencyStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a new key is one statement (the claim); a replay, a refusal and a takeover
    read as before. SQLite reads first (its read is inline, its claim a write)."""
    service = IdempotencyService(idempotency_store, lease=LEASE, retention=RETENTION, clock=clock)
    reads: list[str] = []
    get = idempotency_store.get

    async def counted_get(scope: str, key: str) -> Any:
        reads.append(key)
        return await get(scope, key)

    monkeypatch.setattr(idempotency_store, "get", counted_get)
    first = await service.begin(SCOPE, ['"k1"'], PRINT)
    assert isinstance(first, Execute)
    assert reads == ([] if idempotency_store.db.dialect == "postgresql" else ["k1"])
    with pytest.raises(RequestOutstandingError):
        await service.begin(SCOPE, ['"k1"'], PRINT)
    with pytest.raises(KeyReusedError):
        await service.begin(SCOPE, ['"k1"'], "another payload")
    await service.complete(first.claim, CREATED)
    assert await service.begin(SCOPE, ['"k1"'], PRINT) == Replay(CREATED)
    clock.advance(RETENTION)
    assert isinstance(await service.begin(SCOPE, ['"k1"'], "another payload"), Execute)


# --------------------------------------------------------------------------- a retry after commit


async def test_store_a_claim_retried_after_its_commit_is_still_its_own(
    idempotency_store: SqlIdempotencyStore,
) -> None:
    """The store runs a statement once more when its connection dropped; if the first run had
    committed, the second meets its own claim (same token) and must not report it lost (which
    made the request's own claim look outstanding: 409)."""
    assert await claim(idempotency_store, claim_of(), 1000.0)
    assert await claim(idempotency_store, claim_of(), 1000.0)
    assert not await claim(idempotency_store, claim_of(token="t2"), 1000.0)


# --------------------------------------------------------------------------- in the operation's
# transaction (InTransaction): the key's answer stored without a claim


def pending_of(service: IdempotencyService, fp: str = PRINT, key: str = "k1") -> Any:
    return service.in_transaction(SCOPE, [serialize_key(key)], fp)


async def test_service_in_transaction_parses_without_a_statement(
    service: IdempotencyService, clock: FakeClock
) -> None:
    pending = pending_of(service)
    assert (pending.scope, pending.key, pending.fingerprint) == (SCOPE, "k1", PRINT)
    assert pending.expires_at == clock.now + RETENTION
    assert not pending.stored
    assert await service.store.get(SCOPE, "k1") is None  # nothing claimed
    with pytest.raises(MissingKeyError):
        service.in_transaction(SCOPE, [], PRINT)
    with pytest.raises(MalformedKeyError):
        service.in_transaction(SCOPE, ["k1"], PRINT)


async def test_service_settle_stores_a_refusal_then_replays_it(
    service: IdempotencyService,
) -> None:
    refused = StoredResponse(409, b'{"title": "out-of-order"}', "application/problem+json")
    assert await service.settle(pending_of(service), refused) is None
    record = await service.store.get(SCOPE, "k1")
    assert record is not None
    assert record.response == refused
    # the same request again: its operation refuses again, and the first answer is replayed
    again = StoredResponse(409, b'{"title": "other"}', "application/problem+json")
    assert await service.settle(pending_of(service), again) == Replay(refused)
    with pytest.raises(KeyReusedError):
        await service.settle(pending_of(service, OTHER_PRINT), again)


async def test_service_settle_leaves_a_5xx_unstored_and_a_stored_key_alone(
    service: IdempotencyService,
) -> None:
    pending = pending_of(service)
    assert await service.settle(pending, StoredResponse(503, b"")) is None
    assert await service.store.get(SCOPE, "k1") is None
    pending.stored = True  # the operation's transaction stored it: nothing more to write
    assert await service.settle(pending, CREATED) is None
    assert await service.store.get(SCOPE, "k1") is None


async def test_service_answer_taken_follows_the_holder(service: IdempotencyService) -> None:
    first = await service.begin(SCOPE, ['"k1"'], PRINT)
    assert isinstance(first, Execute)
    held = await service.store.get(SCOPE, "k1")
    assert held is not None
    with pytest.raises(RequestOutstandingError):
        service.answer_taken(pending_of(service), held)
    assert await service.complete(first.claim, CREATED)
    held = await service.store.get(SCOPE, "k1")
    assert held is not None
    assert service.answer_taken(pending_of(service), held) == Replay(CREATED)
    with pytest.raises(KeyReusedError):
        service.answer_taken(pending_of(service, OTHER_PRINT), held)


async def test_store_put_takes_an_expired_key_and_its_own_retry(
    idempotency_store: SqlIdempotencyStore, clock: FakeClock
) -> None:
    service = IdempotencyService(idempotency_store, lease=LEASE, retention=RETENTION, clock=clock)
    pending = pending_of(service)
    assert await idempotency_store.put(pending, CREATED)
    assert await idempotency_store.put(pending, CREATED)  # its own retry after the commit
    assert not await idempotency_store.put(pending_of(service), CREATED)  # another request
    clock.advance(RETENTION)
    assert await idempotency_store.put(pending_of(service, OTHER_PRINT), CREATED)
