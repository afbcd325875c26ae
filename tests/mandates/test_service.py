"""The mandate store contract, on SQLite and PostgreSQL: versions are kept, amendments create new
ones, history shows every version and change, status follows the clock, every change is audited
with the mandate id and version."""

from __future__ import annotations

import time

import pytest

from tests.mandates.conftest import GRANTOR, SETTLEMENT, TRADE, terms
from tests.rar.test_registry import with_
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.errors import InvalidAuthorizationDetailsError
from trustplane.mandates.errors import (
    MandateConflictError,
    MandateInvalidError,
    MandateNotFoundError,
    MandateStateError,
    MandateUnusableError,
)
from trustplane.mandates.model import LegalBasis, MandateAction, MandateFilter, MandateStatus
from trustplane.storage import generations

DAY = 86400


async def test_create_accepted_is_active_and_readable(services: Services, client_id: str) -> None:
    mandate = await services.mandates.create(terms(client_id), actor="test", accepted_by="alice")

    assert (mandate.version, mandate.status, mandate.accepted_by) == (
        1,
        MandateStatus.ACTIVE,
        "alice",
    )
    assert mandate.grantee_lei == services.clients.registry.get(client_id).lei  # type: ignore[union-attr]
    assert mandate.authorization_details == (TRADE,)
    assert await services.mandates.get(mandate.id) == mandate
    assert (await services.mandates.check_usable(mandate.id, 1)).ref == {
        "id": mandate.id,
        "version": 1,
    }


async def test_proposed_until_accepted(services: Services, client_id: str) -> None:
    mandate = await services.mandates.create(terms(client_id), actor="admin")
    assert mandate.status is MandateStatus.PROPOSED
    with pytest.raises(MandateUnusableError) as caught:
        await services.mandates.check_usable(mandate.id, 1)
    assert caught.value.reason == "proposed"

    accepted = await services.mandates.accept(mandate.id, accepted_by="alice", actor="admin")

    assert (accepted.status, accepted.accepted_by, accepted.version) == (
        MandateStatus.ACTIVE,
        "alice",
        1,
    )
    assert accepted.accepted_at is not None
    await services.mandates.check_usable(mandate.id, 1)
    with pytest.raises(MandateStateError, match="only a proposed one can be accepted"):
        await services.mandates.accept(mandate.id, accepted_by="alice", actor="admin")


async def test_amend_creates_a_new_version_and_keeps_the_old(
    services: Services, client_id: str
) -> None:
    v1 = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    narrower = with_(TRADE, "max_notional.amount", 100_000_000)

    v2 = await services.mandates.amend(
        v1.id, actor="admin", changes={"authorization_details": [narrower]}, reason="limit cut"
    )

    assert (v2.id, v2.version, v2.status) == (v1.id, 2, MandateStatus.ACTIVE)
    assert v2.authorization_details == (narrower,)
    old = await services.mandates.get(v1.id, 1)
    assert old.authorization_details == (TRADE,)  # tokens of v1 keep pointing at v1's terms
    assert (old.status, old.current_version) == (MandateStatus.SUPERSEDED, 2)
    history = await services.mandates.history(v1.id)
    assert [m.version for m in history.versions] == [1, 2]
    assert [m.status for m in history.versions] == [MandateStatus.SUPERSEDED, MandateStatus.ACTIVE]
    assert [(c.action, c.version) for c in history.changes] == [
        (MandateAction.CREATED, 1),
        (MandateAction.AMENDED, 2),
    ]
    assert history.changes[1].reason == "limit cut"
    with pytest.raises(MandateUnusableError) as caught:
        await services.mandates.check_usable(v1.id, 1)
    assert caught.value.reason == "superseded"
    await services.mandates.check_usable(v1.id, 2)


async def test_amend_with_a_stale_expected_version_is_a_conflict(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    await services.mandates.amend(
        m.id, actor="a", changes={"scopes": ["order:create", "order:cancel"]}, expected_version=1
    )
    with pytest.raises(MandateConflictError, match="at version 2, not 1"):
        await services.mandates.amend(
            m.id, actor="b", changes={"scopes": ["order:cancel"]}, expected_version=1
        )
    assert [v.version for v in (await services.mandates.history(m.id)).versions] == [1, 2]


async def test_amend_refuses_party_changes_and_bad_terms(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    with pytest.raises(MandateInvalidError, match="cannot amend grantee_client_id"):
        await services.mandates.amend(m.id, actor="a", changes={"grantee_client_id": "x"})
    with pytest.raises(MandateInvalidError, match="scopes not registered"):
        await services.mandates.amend(m.id, actor="a", changes={"scopes": ["report:view"]})
    broader = with_(TRADE, "venues", ["QQQQ"])
    with pytest.raises(InvalidAuthorizationDetailsError, match="is not a 'mic'"):
        await services.mandates.amend(m.id, actor="a", changes={"authorization_details": [broader]})
    assert (await services.mandates.get(m.id)).version == 1  # nothing partial was written


async def test_suspend_resume_revoke(services: Services, client_id: str) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")

    suspended = await services.mandates.suspend(m.id, actor="ops", reason="KYC review")
    assert (suspended.status, suspended.status_reason) == (MandateStatus.SUSPENDED, "KYC review")
    with pytest.raises(MandateUnusableError, match="is suspended"):
        await services.mandates.check_usable(m.id, 1)
    with pytest.raises(MandateStateError):
        await services.mandates.suspend(m.id, actor="ops")

    assert (await services.mandates.resume(m.id, actor="ops")).status is MandateStatus.ACTIVE
    await services.mandates.check_usable(m.id, 1)

    revoked = await services.mandates.revoke(m.id, actor="alice", reason="mandate withdrawn")
    assert revoked.status is MandateStatus.REVOKED
    with pytest.raises(MandateUnusableError) as caught:
        await services.mandates.check_usable(m.id, 1)
    assert caught.value.reason == "revoked"
    assert caught.value.to_oauth().error == "invalid_grant"
    for change in (services.mandates.resume, services.mandates.suspend, services.mandates.revoke):
        with pytest.raises(MandateStateError, match="is revoked"):
            await change(m.id, actor="ops")
    with pytest.raises(MandateStateError, match="revoked and cannot be amended"):
        await services.mandates.amend(m.id, actor="ops", changes={"scopes": ["order:cancel"]})
    actions = [c.action for c in (await services.mandates.history(m.id)).changes]
    assert actions == ["created", "suspended", "resumed", "revoked"]


async def test_expiry_is_evaluated_against_the_clock(services: Services, client_id: str) -> None:
    now = int(time.time())
    m = await services.mandates.create(
        terms(client_id, effective_from=now + DAY, effective_until=now + 2 * DAY),
        actor="admin",
        accepted_by="alice",
    )
    with pytest.raises(MandateUnusableError) as early:
        await services.mandates.check_usable(m.id, 1, now=now)
    assert early.value.reason == "not_yet_effective"
    await services.mandates.check_usable(m.id, 1, now=now + DAY + 1)
    with pytest.raises(MandateUnusableError) as late:
        await services.mandates.check_usable(m.id, 1, now=now + 2 * DAY)
    assert late.value.reason == "expired"
    assert (await services.mandates.get(m.id, now=now + 2 * DAY)).status is MandateStatus.EXPIRED
    # the stored status is untouched: no batch job needed, and amending the dates revives it
    assert (
        await services.mandates.get(m.id, now=now + 2 * DAY)
    ).recorded_status is MandateStatus.ACTIVE
    listed = await services.mandates.list(
        MandateFilter(status=MandateStatus.EXPIRED), now=now + 3 * DAY
    )
    assert [x.id for x in listed] == [m.id]


async def test_unknown_mandate(services: Services) -> None:
    with pytest.raises(MandateNotFoundError):
        await services.mandates.get("mdt_nope")
    with pytest.raises(MandateNotFoundError):
        await services.mandates.revoke("mdt_nope", actor="x")
    with pytest.raises(MandateUnusableError) as caught:
        await services.mandates.check_usable("mdt_nope", 1)
    assert caught.value.reason == "not_found"


async def test_version_out_of_range_is_not_usable(services: Services, client_id: str) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    for version in (0, 2, -1):
        with pytest.raises(MandateUnusableError, match="not found"):
            await services.mandates.check_usable(m.id, version)
    with pytest.raises(MandateNotFoundError):
        await services.mandates.get(m.id, 2)


INVALID_TERMS = [
    ({"grantee_client_id": "no-such-client"}, "not an active client"),
    ({"grantor_lei": "529900T8BM49AURSDO56"}, "not a valid ISO 17442 LEI"),
    ({"scopes": ()}, "at least one scope"),
    ({"scopes": ("report:view",)}, "scopes not registered for the grantee client: report:view"),
    ({"effective_until": 1_000}, "must be after effective_from and in the future"),
    ({"effective_from": 2_000_000_000, "effective_until": 1_999_999_999}, "must be after"),
    ({"legal_basis": LegalBasis.STANDING_INSTRUCTION}, "standing_instruction needs a document_ref"),
    ({"document_ref": "SI\x00-1"}, "document_ref must be 1 to 500 printable characters"),
    ({"document_ref": "x" * 501}, "document_ref must be 1 to 500 printable"),
    ({"grantor_person": "alice\nbob"}, "grantor_person must be 1 to 500 printable"),
    ({"effective_until": 2**63}, "effective_until must be between 0 and 253402300799"),
    ({"effective_from": -5}, "effective_from must be between 0"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID_TERMS)
async def test_invalid_terms_are_refused_without_writing(
    services: Services, client_id: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(MandateInvalidError, match=message):
        await services.mandates.create(terms(client_id, **overrides), actor="admin")
    assert await services.mandates.list() == []


async def test_details_of_an_unregistered_type_are_refused(services: Services) -> None:
    from tests.mandates.conftest import grantee

    kit = await grantee(services, authorization_details_types=["trade_instruction"])
    with pytest.raises(InvalidAuthorizationDetailsError, match="not registered for type"):
        await services.mandates.create(
            terms(kit.client_id, authorization_details=(SETTLEMENT,)), actor="admin"
        )


async def test_list_filters(services: Services, client_id: str) -> None:
    from tests.mandates.conftest import grantee

    other = (await grantee(services)).client_id
    now = int(time.time())
    soon = await services.mandates.create(
        terms(client_id, effective_until=now + 5 * DAY), actor="a", accepted_by="x"
    )
    later = await services.mandates.create(
        terms(client_id, effective_until=now + 50 * DAY), actor="a", accepted_by="x"
    )
    theirs = await services.mandates.create(
        terms(other, grantor_lei="5493001KJTIIGC8Y1R12"), actor="a"
    )
    revoked = await services.mandates.create(
        terms(other, effective_until=now + 2 * DAY), actor="a", accepted_by="x"
    )
    await services.mandates.revoke(revoked.id, actor="a")

    async def ids(**kw: object) -> set[str]:
        return {m.id for m in await services.mandates.list(MandateFilter(**kw))}  # type: ignore[arg-type]

    assert await ids() == {soon.id, later.id, theirs.id, revoked.id}
    assert await ids(grantor_lei=GRANTOR) == {soon.id, later.id, revoked.id}
    assert await ids(grantee_client_id=other) == {theirs.id, revoked.id}
    assert await ids(status=MandateStatus.PROPOSED) == {theirs.id}
    assert await ids(status=MandateStatus.REVOKED) == {revoked.id}
    assert await ids(status=MandateStatus.ACTIVE, grantee_client_id=client_id) == {
        soon.id,
        later.id,
    }
    assert await ids(expiring_within=7 * DAY) == {soon.id}  # the revoked one does not count
    assert await ids(expiring_within=60 * DAY, grantor_lei=GRANTOR) == {soon.id, later.id}


async def test_find_covering(services: Services, client_id: str) -> None:
    m = await services.mandates.create(terms(client_id), actor="a", accepted_by="alice")
    find = services.mandates.find_covering
    narrow = with_(TRADE, "isins", ["US0378331005"])

    assert (await find(GRANTOR, client_id, ["order:create"], [narrow])) == m
    assert (await find(GRANTOR, client_id, ["order:create"], [])) == m
    assert await find(GRANTOR, client_id, ["order:create"], [narrow], grantor_person="alice") == m
    assert await find(GRANTOR, client_id, ["order:create"], [narrow], grantor_person="bob") is None
    assert await find(GRANTOR, client_id, ["order:create", "order:cancel"], [narrow]) is None
    assert (
        await find(GRANTOR, client_id, ["order:create"], [with_(TRADE, "accounts", ["ACC-9"])])
        is None
    )
    assert await find("5493001KJTIIGC8Y1R12", client_id, ["order:create"], []) is None
    await services.mandates.suspend(m.id, actor="ops")
    assert await find(GRANTOR, client_id, ["order:create"], [narrow]) is None


async def test_create_from_consent(services: Services, client_id: str) -> None:
    client = services.clients.registry.get(client_id)
    assert client is not None
    m = await services.mandates.create_from_consent(
        grantor_lei=GRANTOR, grantor_person="alice", client=client, scopes=["order:create"],
        authorization_details=[TRADE], accepted_by="alice",
    )  # fmt: skip
    assert (m.status, m.accepted_by, m.created_by, m.legal_basis) == (
        MandateStatus.ACTIVE, "alice", "user:alice", LegalBasis.MANDATE,
    )  # fmt: skip
    expected_until = m.created_at + services.settings.mandate_default_lifetime
    assert m.effective_until == expected_until


async def test_every_change_is_audited_with_id_and_version(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    await services.mandates.amend(
        m.id, actor="admin", changes={"scopes": ["order:create", "order:cancel"]}
    )
    await services.mandates.suspend(m.id, actor="ops", reason="review")
    await services.mandates.revoke(m.id, actor="alice")

    events = [
        e
        for e in reversed(await recent_events(services.db))
        if e["service"] == "trustplane.mandates"
    ]
    assert [(e["type"], e["mandate_id"], e["mandate_version"]) for e in events] == [
        ("mandates:mandate:created", m.id, 1),
        ("mandates:mandate:amended", m.id, 2),
        ("mandates:mandate:suspended", m.id, 2),
        ("mandates:mandate:revoked", m.id, 2),
    ]
    assert events[0]["client_id"] == client_id
    assert events[0]["partner"] == GRANTOR
    assert events[0]["authorization_details_digest"] == services.rar.digest([TRADE])
    assert events[1]["payload"]["previous_version"] == 1
    assert events[2]["reason"] == "review"
    assert events[3]["payload"]["actor"] == "alice"


async def test_status_changes_bump_the_generation(services: Services, client_id: str) -> None:
    async def generation() -> int:
        async with services.db.read() as conn:
            return (await generations.read_all(conn)).get("mandates", 0)

    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    before = await generation()
    await services.mandates.suspend(m.id, actor="ops")
    assert await generation() == before + 1


async def test_another_process_sees_a_revocation_after_its_cache_refresh(
    services: Services, client_id: str
) -> None:
    """Two processes on one database: B's cached head is stale until its generation poll."""
    from trustplane.app import Services as Svc

    other = Svc.build(services.settings)
    await other.start()
    seen: dict[str, int] = {}
    await other.refresh_caches(seen)
    try:
        m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
        await other.mandates.check_usable(m.id, 1)  # B caches the head
        await services.mandates.revoke(m.id, actor="alice")
        with pytest.raises(MandateUnusableError):
            await services.mandates.check_usable(m.id, 1)  # A: at once
        await other.mandates.check_usable(m.id, 1)  # B: stale until it polls (documented bound)
        await other.refresh_caches(seen)
        with pytest.raises(MandateUnusableError):
            await other.mandates.check_usable(m.id, 1)
    finally:
        await other.stop()


async def test_checks_and_changes_are_counted(services: Services, client_id: str) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    before = {
        "usable": sample("trustplane_mandate_checks_total", outcome="usable"),
        "revoked": sample("trustplane_mandate_checks_total", outcome="revoked"),
        "change": sample("trustplane_mandate_changes_total", action="revoked"),
    }
    await services.mandates.check_usable(m.id, 1)
    await services.mandates.revoke(m.id, actor="alice")
    assert not await services.mandates.is_usable(m.id, 1)

    assert sample("trustplane_mandate_checks_total", outcome="usable") == before["usable"] + 1
    assert sample("trustplane_mandate_checks_total", outcome="revoked") == before["revoked"] + 1
    assert sample("trustplane_mandate_changes_total", action="revoked") == before["change"] + 1


async def test_control_characters_in_reasons_and_actors_are_refused(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")
    with pytest.raises(MandateInvalidError, match="reason must be"):
        await services.mandates.revoke(m.id, actor="ops", reason="bad\x00reason")
    with pytest.raises(MandateInvalidError, match="actor must be"):
        await services.mandates.suspend(m.id, actor="")
    with pytest.raises(MandateInvalidError, match="accepted_by must be"):
        await services.mandates.create(terms(client_id), actor="admin", accepted_by="a\tb")
    assert (await services.mandates.get(m.id)).status is MandateStatus.ACTIVE
