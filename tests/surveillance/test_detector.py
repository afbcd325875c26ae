"""The surveillance signals over a real ledger on SQLite and PostgreSQL: each signal's threshold
exactly met and exceeded, window rollover and the trailing baseline, the learning period, alerts
as ledger entries with their evidence, and the cursor: a restarted or failed detector resumes
without losing or doubling an alert."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.conftest import make_settings
from tests.surveillance.rig import ISSUER, T0, Rig, issued, refused
from trustplane.audit.canonical import entry_parts
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.surveillance import store as surveillance_store
from trustplane.surveillance.detector import Detector
from trustplane.surveillance.service import Round, Surveillance
from trustplane.surveillance.signals import SLICE, Observed
from trustplane.surveillance.store import CursorMoved, SqlSurveillanceStore

MINUTE = 60_000


@pytest.fixture
async def rig(db_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    opened = await Rig.open(
        db_url,
        tmp_path,
        surveillance_issuance_window=60,
        surveillance_issuance_floor=3,
        surveillance_issuance_factor=3.0,
        surveillance_issuance_baseline_windows=3,
        surveillance_claim_failures=3,
        surveillance_claim_failure_window=60,
        surveillance_delegation_learning=2,
        surveillance_max_chain_depth=3,
    )
    yield opened
    await opened.close()


def signals(alerts: list[dict[str, object]]) -> list[object]:
    return [a["reason"] for a in alerts]


async def delegation_alerts(rig: Rig) -> list[dict[str, Any]]:
    """The unusual_delegation alerts (the exchanges also count as issuance)."""
    return [a for a in await rig.alerts() if a["reason"].startswith("unusual_delegation.")]


# --------------------------------------------------------------------------- issuance.spike


async def test_issuance_at_the_floor_is_quiet_one_more_alerts_once(rig: Rig) -> None:
    detector = rig.detector()
    first = await rig.append(*(issued("c-1", T0 + i) for i in range(3)))
    await detector.catch_up()
    assert await rig.alerts() == []  # 3 = the floor: not exceeded

    crossing = await rig.append(issued("c-1", T0 + 10, txn="txn-4"), issued("c-1", T0 + 11))
    raised = await detector.catch_up()
    [alert] = await rig.alerts()
    assert [a.signal.value for a in raised] == ["issuance.spike"]
    assert alert["reason"] == "issuance.spike"
    assert alert["client_id"] == "c-1"
    assert alert["service"] == "trustplane.surveillance"
    assert alert["transaction_id"] == "txn-4"
    assert alert["reason_ids"] == [
        "observed=4",
        "threshold=3",
        "window=60s",
        f"sequence={first[0]},{crossing[0]}",
    ]
    assert alert["payload"]["evidence"]["sequence"] == [first[0], crossing[0]]
    assert alert["payload"]["window_start_ms"] == T0
    assert alert["payload"]["threshold"] == 3.0


async def test_a_new_window_counts_afresh_against_the_trailing_baseline(rig: Rig) -> None:
    detector = rig.detector()
    await rig.append(*(issued("c-1", T0 + i) for i in range(5)))  # window 0: 5, alerts at 4
    # window 1: baseline 5 / 3 windows, x3 = 5 > the floor: 5 is quiet, the 6th alerts
    await rig.append(*(issued("c-1", T0 + MINUTE + i) for i in range(5)))
    await detector.catch_up()
    assert len(await rig.alerts()) == 1
    sixth = await rig.append(issued("c-1", T0 + MINUTE + 9))
    await detector.catch_up()
    second = (await rig.alerts())[-1]
    assert second["reason_ids"][:2] == ["observed=6", "threshold=5"]
    assert second["reason_ids"][-1].endswith(f",{sixth[0]}")
    # window 5: windows 2-4 were empty, the baseline is 0 again and the floor rules
    await rig.append(*(issued("c-1", T0 + 5 * MINUTE + i) for i in range(4)))
    await detector.catch_up()
    assert [a["reason_ids"][:2] for a in await rig.alerts()][-1] == ["observed=4", "threshold=3"]
    assert len(await rig.alerts()) == 3


async def test_clients_are_counted_apart(rig: Rig) -> None:
    await rig.append(*(issued(f"c-{i % 2}", T0 + i) for i in range(8)))  # 4 each
    await rig.detector().catch_up()
    assert sorted(a["client_id"] for a in await rig.alerts()) == ["c-0", "c-1"]


async def test_a_spike_split_over_small_batches_alerts_as_in_one(
    db_url: str, tmp_path: Path
) -> None:
    rig = await Rig.open(
        db_url, tmp_path, surveillance_batch=2, surveillance_issuance_window=60,
        surveillance_issuance_floor=3,
    )  # fmt: skip
    try:
        await rig.append(*(issued("c-1", T0 + i) for i in range(7)))
        await rig.detector().catch_up()
        assert signals(await rig.alerts()) == ["issuance.spike"]
    finally:
        await rig.close()


# --------------------------------------------------------------------------- partner.claim_failures


async def test_claim_failures_alert_when_n_is_reached(rig: Rig) -> None:
    detector = rig.detector()
    await rig.append(refused("p-1", T0), refused("p-1", T0 + 1, "claim_value"))
    await rig.append(refused("p-1", T0 + 2, "signature"), refused("p-2", T0 + 3))  # not counted
    await detector.catch_up()
    assert await rig.alerts() == []
    third = await rig.append(refused("p-1", T0 + 4, "transaction"), refused("p-1", T0 + 5))
    await detector.catch_up()
    [alert] = await rig.alerts()
    assert alert["reason"] == "partner.claim_failures"
    assert alert["partner"] == "p-1"
    assert alert["client_id"] is None
    assert alert["reason_ids"][:3] == ["observed=3", "threshold=3", "window=60s"]
    assert alert["reason_ids"][-1].endswith(f",{third[0]}")


async def test_claim_failures_do_not_add_up_across_windows(rig: Rig) -> None:
    await rig.append(refused("p-1", T0 + MINUTE - 2), refused("p-1", T0 + MINUTE - 1))
    await rig.append(refused("p-1", T0 + MINUTE), refused("p-1", T0 + MINUTE + 1))
    await rig.detector().catch_up()
    assert await rig.alerts() == []


# --------------------------------------------------------------------------- unusual delegation


async def test_a_new_actor_pair_alerts_after_the_learning_period(rig: Rig) -> None:
    detector = rig.detector()
    await rig.append(
        issued("c-x", T0, actors=("svc-a",), subject="alice"),
        issued("c-x", T0 + 1, actors=("svc-a",), subject="bob"),
    )
    await detector.catch_up()
    assert await delegation_alerts(rig) == []  # learned
    seen = await rig.append(
        issued("c-x", T0 + 2, actors=("svc-a",), subject="alice"),  # known pair
        issued("c-x", T0 + 3, actors=("svc-b",), subject="alice", txn="T-1"),  # new pair
        issued("c-y", T0 + 4, actors=("svc-b",), subject="alice"),  # another client: learning
    )
    await detector.catch_up()
    [alert] = await delegation_alerts(rig)
    assert alert["reason"] == "unusual_delegation.new_actor_pair"
    assert alert["client_id"] == "c-x"
    assert alert["subject"] == "alice"
    assert alert["actor_chain"] == ["svc-b"]
    assert alert["transaction_id"] == "T-1"
    assert alert["reason_ids"] == ["observed=1", "threshold=0", f"sequence={seen[1]}"]


async def test_a_chain_deeper_than_the_clients_maximum_alerts(rig: Rig) -> None:
    await rig.append(
        issued("c-x", T0, actors=("svc-a",), subject="alice"),
        issued("c-x", T0 + 1, actors=("svc-a", "svc-0"), subject="alice"),
        issued("c-x", T0 + 2, actors=("svc-a", "svc-0"), subject="alice"),  # 2 = the maximum
        issued("c-x", T0 + 3, actors=("svc-a", "svc-1", "svc-0"), subject="alice"),
    )
    await rig.detector().catch_up()
    [alert] = await delegation_alerts(rig)
    assert alert["reason"] == "unusual_delegation.deep_chain"
    assert alert["reason_ids"][:2] == ["observed=3", "threshold=2"]


async def test_a_chain_beyond_the_absolute_depth_alerts_even_while_learning(rig: Rig) -> None:
    await rig.append(
        issued("c-new", T0, actors=("a", "b", "c"), subject="alice"),  # 3 = the limit
        issued("c-new", T0 + 1, actors=("a", "b", "c", "d"), subject="alice"),
    )
    await rig.detector().catch_up()
    [alert] = await delegation_alerts(rig)
    assert alert["reason"] == "unusual_delegation.deep_chain"
    assert alert["reason_ids"][:2] == ["observed=4", "threshold=3"]


# --------------------------------------------------------------------------- the cursor


async def test_a_restarted_detector_resumes_from_the_cursor(rig: Rig) -> None:
    await rig.append(*(issued("c-1", T0 + i) for i in range(4)))
    assert len(await rig.detector().catch_up()) == 1
    restarted = rig.detector(own_db=True)  # another process, nothing in memory
    assert await restarted.catch_up() == []
    await rig.append(issued("c-1", T0 + 10), *(issued("c-2", T0 + i) for i in range(4)))
    assert [a.client_id for a in await restarted.catch_up()] == ["c-2"]
    assert sorted(a["client_id"] for a in await rig.alerts()) == ["c-1", "c-2"]
    async with rig.db.read() as conn:
        cursor = await surveillance_store.read_cursor(conn)
    assert cursor == await _tree_size(rig) - 1  # the c-2 alert was appended after the last read


class _FailsOnce(SqlSurveillanceStore):
    """The round fails at its last step, as a crash or a lost race would."""

    def __init__(self) -> None:
        self.failed = False

    async def advance(self, conn: AsyncConnection, old: int, new: int) -> None:
        if not self.failed:
            self.failed = True
            raise CursorMoved("injected")
        await super().advance(conn, old, new)


async def test_a_failed_round_keeps_nothing_and_the_next_raises_the_alert_once(rig: Rig) -> None:
    await rig.append(*(issued("c-1", T0 + i) for i in range(4)))
    detector = rig.detector(_FailsOnce())
    with pytest.raises(CursorMoved):
        await detector.round()
    assert await rig.alerts() == []
    assert len(await detector.catch_up()) == 1
    assert signals(await rig.alerts()) == ["issuance.spike"]


async def test_two_detectors_racing_raise_each_alert_once(rig: Rig) -> None:
    one, two = rig.detector(own_db=True), rig.detector(own_db=True)
    for round_ in range(4):
        base = T0 + round_ * 10 * MINUTE
        await rig.append(
            *(issued(f"c-{n}", base + i) for n in range(3) for i in range(4)),
            *(refused("p-1", base + i) for i in range(3)),
        )
        await asyncio.gather(*(d.catch_up() for d in (one, two, one, two)))
    await asyncio.gather(one.catch_up(), two.catch_up())
    alerts = await rig.alerts()
    assert len(alerts) == 4 * 4  # per round: three clients and one partner, once each
    keys = {
        (a["reason"], a["client_id"], a["partner"], a["payload"]["window_start_ms"]) for a in alerts
    }
    assert len(keys) == len(alerts)


class _Overtaken(SqlSurveillanceStore):
    """Another detector moves the cursor between this round's read of the leaves and its claim."""

    def __init__(self, detector: Surveillance) -> None:
        self.other, self.claims = detector, 0

    async def claim(self, conn: AsyncConnection) -> int | None:
        self.claims += 1
        if self.claims == 1:
            assert (await self.other.round()) is not None  # it commits before this claim
        return await super().claim(conn)


async def test_a_round_overtaken_before_its_claim_keeps_nothing(rig: Rig) -> None:
    """Another detector commits a round just before this one claims. SQLite: the leaves were read
    before the claim (outside the write lock) from the old cursor, so the round answers None and
    writes nothing. PostgreSQL: the leaves are read under the claim, from where the other round
    left the cursor (nothing more here). Either way each alert is raised once."""
    await rig.append(*(issued("c-1", T0 + i) for i in range(4)))
    overtaken = _Overtaken(rig.detector(own_db=True))
    detector = rig.detector(overtaken)
    assert await detector.round() == (None if rig.db.is_sqlite else Round(0, []))
    assert signals(await rig.alerts()) == ["issuance.spike"]
    assert await detector.catch_up() == []
    assert signals(await rig.alerts()) == ["issuance.spike"]


async def test_sqlites_write_lock_is_held_for_the_writes_alone_postgresql_reads_under_its_claim(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the leaves, their parse and the detection's reads of its state all come before the
    claim, which is the write lock every token request's commit waits for; the claim covers only
    the writes. PostgreSQL: the claim is an advisory lock no request takes, and everything is read
    after it (a process losing it reads nothing)."""
    claimed: list[bool] = []
    after_claim: dict[str, list[bool]] = {"leaves": [], "windows": [], "pairs": []}

    class Recording(SqlSurveillanceStore):
        async def claim(self, conn: AsyncConnection) -> int | None:
            claimed.append(True)
            return await super().claim(conn)

        async def windows(self, conn: AsyncConnection, *args: Any) -> Any:
            after_claim["windows"].append(bool(claimed))
            return await super().windows(conn, *args)

        async def known_pairs(self, conn: AsyncConnection, pairs: Any) -> Any:
            after_claim["pairs"].append(bool(claimed))
            return await super().known_pairs(conn, pairs)

    read = surveillance_store.read_leaves

    async def recorded(conn: Any, start: int, limit: int) -> Any:
        after_claim["leaves"].append(bool(claimed))
        return await read(conn, start, limit)

    monkeypatch.setattr(surveillance_store, "read_leaves", recorded)
    await rig.append(
        *(issued("c-1", T0 + i) for i in range(4)),
        issued("c-2", T0 + 5, actors=("svc-a",), subject="alice"),
    )
    assert len(await rig.detector(Recording()).catch_up()) == 1
    for step, seen in after_claim.items():
        assert seen, step
        assert set(seen) == {not rig.db.is_sqlite}, step


async def test_a_detector_losing_the_claim_on_postgresql_reads_no_leaves(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers (or instances) catch up at once: the one without the advisory lock answers None
    without reading a leaf, so larger rounds are not read twice."""
    rig = await Rig.open(pg_url, tmp_path)
    try:
        await rig.append(*(issued("c-1", T0 + i) for i in range(4)))
        reads: list[int] = []
        read = surveillance_store.read_leaves

        async def recorded(conn: Any, start: int, limit: int) -> Any:
            reads.append(start)
            return await read(conn, start, limit)

        monkeypatch.setattr(surveillance_store, "read_leaves", recorded)
        async with rig.db.transaction() as holder:  # another process's round, in progress
            lock = surveillance_store.DETECTOR_LOCK
            await holder.exec_driver_sql(f"SELECT pg_advisory_xact_lock({lock})")
            assert await rig.detector(own_db=True).round() is None
        assert reads == []
        done = await rig.detector().round()
        assert done is not None
        assert done.read > 0
        assert reads == [0]
    finally:
        await rig.close()


async def test_a_round_reads_2000_leaves_on_sqlite_and_5000_on_postgresql_unless_set(
    db_url: str, tmp_path: Path
) -> None:
    """SQLite keeps rounds shorter (the claim is the write lock); PostgreSQL's rounds are larger (a
    round's fixed cost is about ten statements, and its claim blocks no request)."""
    rig = await Rig.open(db_url, tmp_path)
    try:
        await rig.append(*(issued(f"c-{i % 7}", T0 + i) for i in range(2100)))
        first = await rig.detector().round()
        assert first is not None
        if rig.db.is_sqlite:
            assert first.read == 2000
        else:  # every leaf: the 2,100 and the ledger's own first entries
            assert 2100 < first.read < 5000
        set_to = Surveillance(
            make_settings(db_url, tmp_path, surveillance_batch=50), rig.db, SqlSurveillanceStore()
        )
        await rig.append(*(issued("c-1", T0 + 1000 + i) for i in range(100)))
        second = await set_to.round()
        assert second is not None
        assert second.read == 50
    finally:
        await rig.close()


async def test_a_large_round_gives_the_event_loop_its_turns(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of leaves are turned into observations and counted a slice at a time, with other
    tasks (a server process's requests) running between slices."""
    ticks = [0]

    async def other_task() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0)

    seen: dict[str, list[int]] = {"observed": [], "counted": []}
    from_leaf, count = Observed.from_leaf, Detector._issuance

    def observed(leaf: Any) -> Observed:
        seen["observed"].append(ticks[0])
        return from_leaf(leaf)

    def counted(self: Detector, *args: Any) -> list[Any]:
        seen["counted"].append(ticks[0])
        return count(self, *args)

    monkeypatch.setattr(Observed, "from_leaf", staticmethod(observed))
    monkeypatch.setattr(Detector, "_issuance", counted)
    await rig.append(*(issued(f"c-{i % 5}", T0 + i) for i in range(3 * SLICE)))
    task = asyncio.create_task(other_task())
    try:
        await rig.detector().catch_up()
    finally:
        task.cancel()
    for step, at in seen.items():
        assert len(at) >= 3 * SLICE, step
        assert at[0] < at[SLICE] < at[2 * SLICE], step  # the other task ran between slices


async def test_only_the_entries_the_detector_needs_are_read(rig: Rig) -> None:
    """A leaf comes with its columns; its entry text only for an exchange (the ``act`` chain) or a
    refusal (``reason_ids``): a client-credentials issuance and every unwatched entry (the
    decisions) cost no text and no parse. What is read still gives the detector every field."""
    decision = AuditEvent(
        type=AuditEventType.POLICY_DECISION_ALLOWED, issuer=ISSUER, client_id="c-1", time=T0
    )
    await rig.append(
        issued("c-1", T0, txn="t-1"),
        decision,
        issued("c-2", T0 + 1, actors=("svc-a", "svc-b"), subject="alice"),
        refused("p-1", T0 + 2, reason="claim_value"),
    )
    async with rig.db.read() as conn:
        leaves = await surveillance_store.read_leaves(conn, 0, 100)
    by_type = [(leaf[1], leaf[7] is not None) for leaf in leaves[-4:]]
    assert by_type == [
        (AuditEventType.TOKEN_ISSUED.value, False),
        (AuditEventType.POLICY_DECISION_ALLOWED.value, False),
        (AuditEventType.TOKEN_ISSUED.value, True),
        (AuditEventType.TOKEN_REFUSED.value, True),
    ]
    cc, _, exchange, refusal = (Observed.from_leaf(leaf) for leaf in leaves[-4:])
    assert (cc.client_id, cc.subject, cc.transaction_id, cc.time_ms, cc.actor_chain) == (
        "c-1",
        "c-1",
        "t-1",
        T0,
        (),
    )
    assert (exchange.subject, exchange.actor_chain) == ("alice", ("svc-a", "svc-b"))
    assert (refusal.partner, refusal.reason_ids) == ("p-1", ("claim_value",))


def test_an_empty_chain_begins_every_canonical_entry_that_has_one() -> None:
    """The read skips an issuance's entry only on this prefix: if the canonical form ever put
    something before an empty ``actor_chain``, every entry would be read again (correct, slower),
    and this test says so."""
    entry, _, _ = entry_parts(issued("c-1", T0))
    assert entry.decode().startswith(surveillance_store.NO_CHAIN)
    chained, _, _ = entry_parts(issued("c-1", T0, actors=("svc-a",)))
    assert not chained.decode().startswith(surveillance_store.NO_CHAIN)


async def test_each_alert_counts_in_the_metric(rig: Rig) -> None:
    def value() -> float:
        sample = REGISTRY.get_sample_value(
            "trustplane_surveillance_alerts_total", {"signal": "partner.claim_failures"}
        )
        return sample or 0.0

    before = value()
    await rig.append(*(refused("p-9", T0 + i) for i in range(3)))
    await rig.detector().catch_up()
    assert value() == before + 1


async def _tree_size(rig: Rig) -> int:
    await rig.ledger.integrate_all()
    checkpoint = await rig.ledger.checkpoint()
    assert checkpoint is not None
    return checkpoint.size


# --------------------------------------------------------------------------- an idle round


async def test_an_idle_round_is_one_statement(rig: Rig) -> None:
    """With the cursor at the end of the log, a round reads one statement and writes nothing (it
    runs every ``surveillance_interval`` in every process of an idle deployment; it was two)."""
    detector = rig.detector()
    await rig.append(issued("c-idle", T0))
    await detector.catch_up()
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engines = [rig.db.engine.sync_engine]
    if not rig.db.is_sqlite:
        engines.append(rig.db.autocommit_engine.sync_engine)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", seen)
    try:
        assert await detector.round() == Round(0, [])
        await rig.append(issued("c-idle", T0 + 1))
        assert (await detector.round()) == Round(1, [])  # a new leaf is read and passed
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", seen)
    idle_check = "MAX(AUDIT_LEAVES.IDX)"  # the log's end against the cursor (store.has_unread)
    assert idle_check in statements[0].upper()
    assert idle_check not in statements[1].upper()  # the first is all
