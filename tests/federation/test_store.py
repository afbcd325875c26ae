"""The partner store contract and the service's unit of work, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.federation.partners import Partner
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.federation.profile import ProfileError
from trustplane.federation.service import PartnerExistsError, PartnerNotFoundError
from trustplane.federation.store import SqlPartnerStore, StoredProfile, VersionConflictError
from trustplane.storage import generations
from trustplane.storage.db import Database

ISSUER = "http://127.0.0.1:8000"


def _stored(partner_id: str, version: int, status: str = "active") -> StoredProfile:
    return StoredProfile(
        partner_id, version, status, {"partner_id": partner_id, "v": version}, 1, "t"
    )


async def _append(db: Database, *profiles: StoredProfile) -> None:
    async with db.transaction() as conn:
        for profile in profiles:
            await SqlPartnerStore().append(conn, profile)


async def test_versions_append_and_current_is_the_newest(db_url: str) -> None:
    db, store = Database(db_url), SqlPartnerStore()
    try:
        await _append(db, _stored("p-a", 1), _stored("p-b", 1), _stored("p-a", 2, "disabled"))
        async with db.read() as conn:
            current = await store.current(conn, "p-a")
            listed = await store.list_current(conn)
            history = await store.history(conn, "p-a")
            unknown = await store.current(conn, "p-z")
        assert current is not None
        assert (current.version, current.status, current.document["v"]) == (2, "disabled", 2)
        assert [(p.partner_id, p.version) for p in listed] == [("p-a", 2), ("p-b", 1)]
        assert [p.version for p in history] == [1, 2]
        assert unknown is None
    finally:
        await db.dispose()


@pytest.mark.parametrize("version", [1, 3])
async def test_a_version_that_is_not_next_is_refused_and_nothing_is_written(
    db_url: str, version: int
) -> None:
    db = Database(db_url)
    try:
        await _append(db, _stored("p-a", 1))
        with pytest.raises(VersionConflictError):
            await _append(db, _stored("p-a", version))
        async with db.read() as conn:
            assert [p.version for p in await SqlPartnerStore().history(conn, "p-a")] == [1]
    finally:
        await db.dispose()


async def test_an_issuer_belongs_to_one_partner(db_url: str) -> None:
    db, store = Database(db_url), SqlPartnerStore()
    try:
        async with db.transaction() as conn:
            assert await store.claim_issuers(conn, "p-a", ["https://a", "https://shared"]) == []
            assert await store.claim_issuers(conn, "p-b", ["https://shared", "https://b"]) == [
                "https://shared"
            ]
            # a partner may re-claim (and drop) its own issuers
            assert await store.claim_issuers(conn, "p-a", ["https://a2"]) == []
            assert await store.claim_issuers(conn, "p-b", ["https://shared"]) == []
    finally:
        await db.dispose()


async def test_racing_writers_of_the_same_version_one_wins(db_url: str) -> None:
    """Two transactions both read version 1 as current and append version 2: the primary key lets
    exactly one commit (on SQLite the writers serialise; the second sees version 2 and is refused)."""
    db = Database(db_url)
    try:
        await _append(db, _stored("p-a", 1))

        async def writer(tag: str) -> str:
            try:
                async with db.transaction() as conn:
                    await _slow_append(conn, _stored("p-a", 2))
            except VersionConflictError:
                return "conflict"
            return "ok"

        results = await asyncio.gather(writer("x"), writer("y"))
        assert sorted(results) == ["conflict", "ok"]
    finally:
        await db.dispose()


async def _slow_append(conn: AsyncConnection, profile: StoredProfile) -> None:
    await asyncio.sleep(0.05)
    await SqlPartnerStore().append(conn, profile)


# --------------------------------------------------------------------------- the service


async def test_add_update_disable_are_versioned_audited_and_reload_the_registry(
    services: Services,
) -> None:
    partner = Partner("partner-a", "https://idp.a.example", ISSUER)
    fed = services.federation
    before = fed.registry.generation

    added = await fed.add(partner.profile(), changed_by="alice")
    updated = await fed.update(
        "partner-a", partner.profile(max_assertion_lifetime=120), changed_by="bob"
    )
    disabled = await fed.disable("partner-a", changed_by="carol", reason="contract ended")

    assert [added.version, updated.version, disabled.version] == [1, 2, 3]
    assert fed.registry.generation == before + 3
    profile = fed.registry.partner_for_issuer("https://idp.a.example")
    assert profile is not None
    assert (profile.version, profile.active, profile.max_assertion_lifetime) == (3, False, 120)
    events = list(reversed(await recent_events(services.db, 10)))
    federation = [e for e in events if e["type"].startswith("federation:")]
    assert [e["type"] for e in federation] == [
        "federation:partner:added",
        "federation:partner:updated",
        "federation:partner:disabled",
    ]
    assert [e["payload"]["changed_by"] for e in federation] == ["alice", "bob", "carol"]
    assert [e["payload"]["version"] for e in federation] == [1, 2, 3]
    assert federation[2]["reason"] == "contract ended"
    assert all(e["partner"] == "partner-a" for e in federation)
    async with services.db.read() as conn:
        assert (await generations.read_all(conn))["partners"] == 3
    assert [v.version for v in await fed.history("partner-a")] == [1, 2, 3]


async def test_refused_changes_write_nothing(services: Services) -> None:
    a = Partner("partner-a", "https://idp.a.example", ISSUER)
    fed = services.federation
    await fed.add(a.profile(), changed_by="t")
    refusals: list[tuple[Any, type[Exception]]] = [
        (fed.add(a.profile(), changed_by="t"), PartnerExistsError),
        (fed.update("partner-z", a.profile(partner_id="partner-z", issuers=["https://z.example"]), changed_by="t"), PartnerNotFoundError),
        (fed.update("partner-a", a.profile(partner_id="partner-b"), changed_by="t"), ProfileError),
        (fed.add(a.profile(partner_id="partner-b"), changed_by="t"), ProfileError),  # same issuer
        (fed.add(a.profile(partner_id="partner-c", lei="bad"), changed_by="t"), ProfileError),
        (fed.disable("partner-z", changed_by="t"), PartnerNotFoundError),
    ]  # fmt: skip
    for call, error in refusals:
        with pytest.raises(error):
            await call
    assert [p.partner_id for p in await fed.current()] == ["partner-a"]
    assert [v.version for v in await fed.history("partner-a")] == [1]
    added = await recent_events(services.db, 10)
    assert [e["type"] for e in added if e["type"].startswith("federation:")] == [
        "federation:partner:added"
    ]


async def test_a_second_process_reloads_on_the_generation_counter(services: Services) -> None:
    """Another Services on the same database (another process) sees the partner after refresh."""
    other = Services.build(services.settings)
    await other.start()
    try:
        seen: dict[str, int] = {}
        await other.refresh_caches(seen)
        assert other.federation.registry.get("partner-a") is None
        await services.federation.add(
            Partner("partner-a", "https://idp.a.example", ISSUER).profile(), changed_by="t"
        )
        await other.refresh_caches(seen)
        assert other.federation.registry.get("partner-a") is not None
    finally:
        await other.stop()
