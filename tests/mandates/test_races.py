"""Racing changes of one mandate leave a consistent state: each amendment gets its own version, a
stale ``expected_version`` is a clear conflict, and nothing amends a revoked mandate. PostgreSQL
(row lock taken by the first statement) and SQLite (write lock) both serialise the changes."""

from __future__ import annotations

import asyncio

from tests.mandates.conftest import terms
from trustplane.app import Services
from trustplane.mandates.errors import MandateConflictError, MandateStateError
from trustplane.mandates.model import MandateAction, MandateStatus

RACERS = 6
SCOPE_SETS = [["order:create"], ["order:cancel"], ["order:create", "order:cancel"]]


async def test_racing_amendments_each_get_exactly_one_new_version(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")

    results = await asyncio.gather(
        *(
            services.mandates.amend(m.id, actor=f"racer-{i}", changes={"scopes": SCOPE_SETS[i % 3]})
            for i in range(RACERS)
        )
    )

    assert sorted(r.version for r in results) == list(range(2, RACERS + 2))
    history = await services.mandates.history(m.id)
    assert [v.version for v in history.versions] == list(range(1, RACERS + 2))
    amended = [c for c in history.changes if c.action is MandateAction.AMENDED]
    assert sorted(c.version for c in amended) == list(range(2, RACERS + 2))
    assert {c.actor for c in amended} == {f"racer-{i}" for i in range(RACERS)}
    assert (await services.mandates.get(m.id)).current_version == RACERS + 1


async def test_racing_amendments_of_one_expected_version_one_wins(
    services: Services, client_id: str
) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")

    results = await asyncio.gather(
        *(
            services.mandates.amend(
                m.id, actor=f"racer-{i}", changes={"scopes": SCOPE_SETS[i % 3]}, expected_version=1
            )
            for i in range(RACERS)
        ),
        return_exceptions=True,
    )

    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert [w.version for w in won] == [2]
    assert len(lost) == RACERS - 1
    assert all(isinstance(e, MandateConflictError) for e in lost), lost
    assert [v.version for v in (await services.mandates.history(m.id)).versions] == [1, 2]


async def test_racing_amend_and_revoke(services: Services, client_id: str) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")

    amend, revoke = await asyncio.gather(
        services.mandates.amend(m.id, actor="a", changes={"scopes": ["order:cancel"]}),
        services.mandates.revoke(m.id, actor="b"),
        return_exceptions=True,
    )

    assert not isinstance(revoke, BaseException), revoke
    final = await services.mandates.get(m.id)
    assert final.recorded_status is MandateStatus.REVOKED
    history = await services.mandates.history(m.id)
    if isinstance(amend, BaseException):  # revoke first: the amendment is refused, clearly
        assert isinstance(amend, MandateStateError)
        assert final.current_version == 1
    else:  # amend first: v2 exists and is the revoked one
        assert final.current_version == 2 == amend.version
    assert history.changes[-1].action is MandateAction.REVOKED
    assert history.changes[-1].version == final.current_version


async def test_racing_revocations_record_one(services: Services, client_id: str) -> None:
    m = await services.mandates.create(terms(client_id), actor="admin", accepted_by="alice")

    results = await asyncio.gather(
        *(services.mandates.revoke(m.id, actor=f"r{i}") for i in range(4)), return_exceptions=True
    )

    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, MandateStateError) for r in results if isinstance(r, BaseException))
    changes = (await services.mandates.history(m.id)).changes
    assert [c.action for c in changes].count(MandateAction.REVOKED) == 1
