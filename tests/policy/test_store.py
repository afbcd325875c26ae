"""The bundle store and lifecycle on SQLite and PostgreSQL: publish, exactly one active bundle
(compare-and-set, proven with racing activations on PostgreSQL), rollback, the generation counter."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.conftest import make_settings
from trustplane.audit.sink import recent_events
from trustplane.policy.bundle import BundleSource, default_bundle
from trustplane.policy.service import (
    BUILTIN_CHANGE_REF,
    GENERATION,
    PolicyService,
    PublishRefused,
    build_policy,
)
from trustplane.policy.store import ActivationConflict, SqlBundleStore, UnknownBundle
from trustplane.policy.tables import policy_bundles
from trustplane.storage import generations
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter


def variant(n: int) -> BundleSource:
    """The default bundle with one more (harmless, tested) rule: another content version."""
    files = dict(default_bundle().files)
    files["extra.cedar"] = (
        f'@id("extra.rule{n}")\nforbid (principal, action == Action::"report:export", resource)\n'
        f"when {{ context.delegation_depth == {100 + n} }};\n"
    )
    return BundleSource(files)


def service(db: Database, tmp_path: Path) -> PolicyService:
    settings = make_settings(db.url, tmp_path)
    return build_policy(settings, db, GroupCommitWriter(db))


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.dispose()


async def active_count(db: Database) -> int:
    async with db.read() as conn:
        query = select(func.count()).where(policy_bundles.c.status == "active")
        return int((await conn.execute(query)).scalar() or 0)


async def test_first_start_publishes_and_activates_the_default(
    db: Database, tmp_path: Path
) -> None:
    svc = service(db, tmp_path)
    await svc.ensure_default()
    await svc.load()
    records, history = await svc.list()
    assert [(r.status, r.change_ref, r.author) for r in records] == [
        ("active", BUILTIN_CHANGE_REF, "trustplane")
    ]
    assert svc.engine.version == default_bundle().version == records[0].version
    assert history[0].version == records[0].version
    assert history[0].previous_version is None
    await svc.ensure_default()  # a second start changes nothing
    assert len((await svc.list())[0]) == 1


async def test_publish_is_idempotent_and_audited(db: Database, tmp_path: Path) -> None:
    svc = service(db, tmp_path)
    first = await svc.publish(variant(1), "CR-1042", "alice")
    again = await svc.publish(variant(1), "CR-9999", "bob")
    assert first.created
    assert not again.created
    assert again.record.change_ref == "CR-1042"
    assert again.record.author == "alice"
    assert first.record.status == "published"
    assert len(first.tests) > 0
    events = await recent_events(db, 10, "policy:bundle:published")
    assert [(e["policy_bundle_version"], e["payload"]["change_ref"]) for e in events] == [
        (first.record.version, "CR-1042")
    ]


async def test_publish_refuses_without_change_ref(db: Database, tmp_path: Path) -> None:
    with pytest.raises(PublishRefused, match="change reference"):
        await service(db, tmp_path).publish(variant(1), " ", "alice")


async def test_activate_rollback_and_generation(db: Database, tmp_path: Path) -> None:
    svc = service(db, tmp_path)
    await svc.ensure_default()
    default_version = default_bundle().version
    v1 = (await svc.publish(variant(1), "CR-1", "alice")).record.version
    async with db.read() as conn:
        before = (await generations.read_all(conn)).get(GENERATION, 0)
    activation = await svc.activate(v1[:10], "bob", "CR-1")  # a prefix resolves
    assert (activation.version, activation.previous_version) == (v1, default_version)
    assert svc.engine.version == v1
    async with db.read() as conn:
        assert (await generations.read_all(conn))[GENERATION] == before + 1
    assert await active_count(db) == 1

    rolled = await svc.rollback("carol", "INC-7")
    assert (rolled.version, rolled.previous_version, rolled.action) == (
        default_version,
        v1,
        "rollback",
    )
    assert svc.engine.version == default_version
    statuses = {r.version: r.status for r in (await svc.list())[0]}
    assert statuses == {default_version: "active", v1: "retired"}
    types = [e["type"] for e in await recent_events(db, 10)]
    assert types[:2] == ["policy:bundle:rolled_back", "policy:bundle:activated"]


async def test_activation_errors(db: Database, tmp_path: Path) -> None:
    svc = service(db, tmp_path)
    with pytest.raises(UnknownBundle, match="no previous bundle"):
        await svc.rollback("x", None)
    await svc.ensure_default()
    with pytest.raises(UnknownBundle, match="matches no published bundle"):
        await svc.activate("deadbeefdeadbeef", "x", None)
    with pytest.raises(UnknownBundle, match="at least 8"):
        await svc.activate("abc", "x", None)
    with pytest.raises(ActivationConflict, match="already active"):
        await svc.activate(default_bundle().version, "x", None)
    with pytest.raises(UnknownBundle, match="no previous bundle"):
        await svc.rollback("x", None)  # the first activation has nothing before it


async def test_stale_compare_and_set_changes_nothing(db: Database, tmp_path: Path) -> None:
    svc = service(db, tmp_path)
    await svc.ensure_default()
    v1 = (await svc.publish(variant(1), "CR-1", "a")).record.version
    v2 = (await svc.publish(variant(2), "CR-2", "a")).record.version
    await svc.activate(v1, "a", None)
    store = SqlBundleStore()
    with pytest.raises(ActivationConflict):
        async with db.transaction() as conn:  # believes the default is still active
            await store.activate(
                conn, v2, expected=default_bundle().version, actor="a", change_ref=None
            )
    async with db.read() as conn:
        assert await store.active_version(conn) == v1
    assert await active_count(db) == 1


async def test_another_process_picks_up_an_activation(db: Database, tmp_path: Path) -> None:
    """Process B loads the bundle process A activated once the generation counter moved."""
    a, b = service(db, tmp_path), service(db, tmp_path)
    await a.ensure_default()
    await b.load()
    v1 = (await a.publish(variant(1), "CR-1", "a")).record.version
    await a.activate(v1, "a", None)
    assert b.engine.version == default_bundle().version
    await b.load()
    assert b.engine.version == v1


@pytest.mark.postgres
async def test_racing_activations_exactly_one_wins(pg_url: str, tmp_path: Path) -> None:
    """Six transactions that all saw the default active try to switch to six bundles at once."""
    db = Database(pg_url)
    try:
        svc = service(db, tmp_path)
        await svc.ensure_default()
        versions = [
            (await svc.publish(variant(i), f"CR-{i}", "a")).record.version for i in range(6)
        ]
        store, start = SqlBundleStore(), asyncio.Event()

        async def activate(version: str) -> str:
            async with db.transaction() as conn:
                current = await store.active_version(conn)
                await start.wait()  # every transaction has read the same active bundle
                await store.activate(conn, version, expected=current, actor="r", change_ref=None)
            return version

        tasks = [asyncio.create_task(activate(v)) for v in versions]
        await asyncio.sleep(0.5)
        start.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        winners = [r for r in results if isinstance(r, str)]
        assert len(winners) == 1, results
        assert all(isinstance(r, ActivationConflict) for r in results if r not in winners)
        assert await active_count(db) == 1
        async with db.read() as conn:
            assert await store.active_version(conn) == winners[0]
            assert [a.version for a in await store.history(conn)] == [
                winners[0],
                default_bundle().version,
            ]
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_racing_service_activations_never_lose_an_update(pg_url: str, tmp_path: Path) -> None:
    """Through the service (each reads the active bundle itself): whatever interleaving, the
    activations that succeed form one chain and the last of them is the active bundle."""
    db = Database(pg_url)
    try:
        svcs = [service(db, tmp_path) for _ in range(6)]
        await svcs[0].ensure_default()
        versions = [
            (await svcs[0].publish(variant(i), f"CR-{i}", "a")).record.version for i in range(6)
        ]
        results = await asyncio.gather(
            *(s.activate(v, "racer", None) for s, v in zip(svcs, versions, strict=True)),
            return_exceptions=True,
        )
        assert all(
            isinstance(r, ActivationConflict) for r in results if isinstance(r, BaseException)
        )
        assert await active_count(db) == 1
        async with db.read() as conn:
            history = list(reversed(await SqlBundleStore().history(conn)))
            active = await SqlBundleStore().active_version(conn)
        for before, after in itertools.pairwise(history):
            assert after.previous_version == before.version
        assert history[-1].version == active
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_racing_first_activations_leave_one_active(pg_url: str, tmp_path: Path) -> None:
    """Several processes starting at once on an empty database: one default bundle is active."""
    db = Database(pg_url)
    try:
        svcs = [service(db, tmp_path) for _ in range(5)]
        await asyncio.gather(*(s.ensure_default() for s in svcs))
        assert await active_count(db) == 1
        for s in svcs:
            await s.load()
            assert s.engine.version == default_bundle().version
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_racing_rollbacks_roll_back_once(pg_url: str, tmp_path: Path) -> None:
    db = Database(pg_url)
    try:
        svcs = [service(db, tmp_path) for _ in range(4)]
        await svcs[0].ensure_default()
        v1 = (await svcs[0].publish(variant(1), "CR-1", "a")).record.version
        await svcs[0].activate(v1, "a", None)
        results = await asyncio.gather(
            *(s.rollback("r", None, from_version=v1) for s in svcs), return_exceptions=True
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1, results
        async with db.read() as conn:
            assert await SqlBundleStore().active_version(conn) == default_bundle().version
    finally:
        await db.dispose()


async def test_rollback_from_a_version_that_is_no_longer_active_is_refused(
    db_url: str, tmp_path: Path
) -> None:
    """Two rollbacks in a row undo each other; naming the bundle to roll back from makes the
    second one a conflict instead (what an operator racing a colleague wants)."""
    db = Database(db_url)
    try:
        svc = service(db, tmp_path)
        await svc.ensure_default()
        v1 = (await svc.publish(variant(1), "CR-1", "a")).record.version
        await svc.activate(v1, "a", None)
        await svc.rollback("r", None, from_version=v1[:12])
        with pytest.raises(ActivationConflict, match="not"):
            await svc.rollback("r", None, from_version=v1[:12])
        async with db.read() as conn:
            assert await SqlBundleStore().active_version(conn) == default_bundle().version
    finally:
        await db.dispose()
