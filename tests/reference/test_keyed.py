"""The Idempotency-Key stored in the transition's own statement on PostgreSQL (``store_pg``'s
transition function, ``KeyedAnswer``): a keyed transition over HTTP is one statement, after the
trade read unless the owner's store object moved the trade last (it was the claim, the read, the
transition and the completion: four), with the SDK's
semantics kept (a replay returns the stored answer, another body under the key is refused, a key
held writes nothing); and a call retried after its commit (the connection dropped before the
answer) answers as the first attempt would have, not 409 naming its own transition."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from tests.reference import test_http
from tests.reference.conftest import ORDER
from tests.reference.test_http import Harness
from tests.reference.test_store_reads import _clear, _envelope, _wire, _words
from trustplane.pep.idempotency import InTransaction, KeyTaken, StoredResponse
from trustplane.pep.idempotency_store import idempotency_keys
from trustplane.reference import machine, store_pg
from trustplane.reference.store import (
    DuplicateTransition,
    KeyedAnswer,
    TradeStore,
    outbox,
    transitions,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
async def ref_url(pg_database: str) -> str:
    """PostgreSQL only (overrides the conftest's SQLite/PostgreSQL pair)."""
    return pg_database


#: test_http's application on that database
harness = test_http.harness


async def _keys(store: TradeStore) -> list[Any]:
    async with store.db.transaction() as conn:
        return list((await conn.execute(select(idempotency_keys))).all())


async def _count(store: TradeStore, table: Any) -> int:
    async with store.db.transaction() as conn:
        return len((await conn.execute(select(table))).all())


async def test_a_keyed_transition_is_one_statement(harness: Harness) -> None:
    h = harness
    created = await h.client.post("/orders", json=ORDER, headers=h.headers(key="o1"))
    trade_id = created.json()["trade_id"]
    await h.store.db.dispose()  # the pools start empty: every statement from here is logged
    sent = _wire(h.store.db)
    first = await h.client.post(f"/trades/{trade_id}/execute", headers=h.headers("b", key="e1"))
    assert first.status_code == 200, first.text
    # the transition's statement alone: the trade as its creation left it in this store object
    # (``TradeStore.last_known``); before: INSERT, SELECT, SELECT, UPDATE, then the read and it
    assert await _words(sent) == ["SELECT"]
    (row,) = [k for k in await _keys(h.store) if k.key == "e1"]
    assert (row.state, row.status, bytes(row.body)) == ("completed", 200, first.content)
    assert row.content_type == "application/json"

    await _clear(sent)
    replay = await h.client.post(f"/trades/{trade_id}/execute", headers=h.headers("b", key="e1"))
    assert (replay.status_code, replay.content) == (200, first.content)
    assert replay.headers["Idempotency-Replayed"] == "true"
    # the read, the transition's own answer (done), the key's put that changes nothing, its read
    assert await _words(sent) == ["SELECT", "SELECT", "INSERT", "SELECT"]
    (again,) = [k for k in await _keys(h.store) if k.key == "e1"]
    assert again.claim_token == row.claim_token


async def test_a_key_used_on_another_trade_is_refused_and_writes_nothing(
    harness: Harness,
) -> None:
    h = harness
    ids = []
    for key in ("o1", "o2"):
        created = await h.client.post("/orders", json=ORDER, headers=h.headers(key=key))
        ids.append(created.json()["trade_id"])
    first = await h.client.post(f"/trades/{ids[0]}/execute", headers=h.headers(key="e"))
    assert first.status_code == 200
    reused = await h.client.post(f"/trades/{ids[1]}/execute", headers=h.headers(key="e"))
    assert reused.status_code == 422
    assert reused.json()["title"] == "Idempotency-Key is already used"
    assert (await h.store.trade(ids[1])).state == machine.CREATED
    assert [t.transition for t in await h.store.history(ids[1])] == ["create"]
    assert await _count(h.store, outbox) == 3  # two orders, one execution


async def test_concurrent_requests_with_one_key_execute_once_and_answer_alike(
    harness: Harness,
) -> None:
    h = harness
    created = await h.client.post("/orders", json=ORDER, headers=h.headers(key="o"))
    trade_id = created.json()["trade_id"]
    answers = await asyncio.gather(
        *(
            h.client.post(f"/trades/{trade_id}/execute", headers=h.headers("b", key="same"))
            for _ in range(6)
        )
    )
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert sum("Idempotency-Replayed" not in a.headers for a in answers) == 1
    assert [t.transition for t in await h.store.history(trade_id)] == ["create", "execute"]


async def test_a_refused_keyed_transition_leaves_no_key_behind(harness: Harness) -> None:
    """The compare-and-set lost (a transition under another key won meanwhile): the key's row,
    written first in the statement, is deleted in it (the HTTP layer then stores the refusal)."""
    h = harness
    created = await h.client.post("/orders", json=ORDER, headers=h.headers(key="o"))
    trade_id = created.json()["trade_id"]
    await h.store.apply(trade_id, machine.EXECUTE, "x", _envelope(), "elsewhere")
    keyed = _keyed("late")
    with pytest.raises(DuplicateTransition):
        await h.store.apply(trade_id, machine.EXECUTE, "b", _envelope(), keyed)
    assert not keyed.pending.stored
    assert [k.key for k in await _keys(h.store)] == ["o"]


def _keyed(key: str, fp: str = "f" * 64, token: str = "tok") -> KeyedAnswer:
    pending = InTransaction("trade:execute c", key, fp, token, 1000.0, 4_000_000_000.0)
    return KeyedAnswer(pending, lambda r: StoredResponse(200, b'{"ok": 1}', "application/json"))


async def test_a_held_key_stops_the_statement_with_the_holder(harness: Harness) -> None:
    h = harness
    for trade_id in ("T-1", "T-2"):
        await h.store.create(trade_id, ORDER, "a", _envelope(), None)
    keyed = _keyed("k")
    await h.store.apply("T-1", machine.EXECUTE, "b", _envelope(), keyed)
    assert keyed.pending.stored
    other = _keyed("k", fp="0" * 64, token="tok-2")
    with pytest.raises(KeyTaken) as taken:
        await h.store.apply("T-2", machine.EXECUTE, "b", _envelope(), other)
    assert (taken.value.record.fingerprint, taken.value.record.response) == (
        "f" * 64,
        StoredResponse(200, b'{"ok": 1}', "application/json"),
    )
    assert not other.pending.stored
    assert (await h.store.trade("T-2")).state == machine.CREATED
    assert await _count(h.store, transitions) == 3


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_transition_retried_after_its_commit_answers_as_the_first(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """The connection is killed (``pg_terminate_backend``) after the statement committed and
    before its answer reached the caller's code: the store's retry on a fresh connection finds
    the transition it made (its event id) and returns it (before: 409 naming itself)."""
    h = harness
    await h.store.create("T-1", ORDER, "alice", _envelope(), None)
    real, attempts = store_pg._fetchrow, []

    async def dropped_after_commit(db: Any, sql: str, params: tuple[Any, ...]) -> Any:
        async def call(driver: Any) -> Any:
            attempts.append(sql)
            row = await driver.fetchrow(sql, *params)
            if len(attempts) == 1:
                await driver.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return row

        return await store_pg._on_driver(db, call)

    monkeypatch.setattr(store_pg, "_fetchrow", dropped_after_commit)
    key = _keyed("k") if keyed else "k"
    record = await h.store.apply("T-1", machine.EXECUTE, "b", _envelope(), key)
    monkeypatch.setattr(store_pg, "_fetchrow", real)
    assert len(attempts) == 2
    assert (record.transition, record.actor, record.idempotency_key) == ("execute", "b", "k")
    assert [t.event_id for t in await h.store.history("T-1")][1] == record.event_id
    assert await _count(h.store, outbox) == 2
    if isinstance(key, KeyedAnswer):
        assert key.pending.stored
        assert [k.key for k in await _keys(h.store)] == ["k"]


async def test_the_same_call_twice_is_one_transition(harness: Harness) -> None:
    """The function itself, called twice with the same parameters (the same event id)."""
    h = harness
    await h.store.create("T-1", ORDER, "alice", _envelope(), None)
    event = h.store._event("trade.executed", "T-1", "execute", "executed", _envelope(), {}, 1.0)
    params = (
        "T-1", "created", "executed", None, None, None, None, "execute", "b", "k",
        event["event_id"], None, None, None, event["type"], "txn-1", event["jws"], 1000, 7,
        *(None,) * 8,
    )  # fmt: skip
    assert await store_pg.apply(h.store.db, params) == (True, None)
    assert await store_pg.apply(h.store.db, params) == (True, None)
    assert [t.transition for t in await h.store.history("T-1")] == ["create", "execute"]
    assert await _count(h.store, outbox) == 2
