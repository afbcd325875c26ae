"""PostgreSQL: a batch of token exchanges is the token endpoint's one statement too. The subject
tokens' revocation is read in the statement's last step, the SSF derivation rows are one of its
CTEs; a revoked subject token fails the statement, which writes nothing, and the batch records,
the transactional way, exactly what :func:`record_batch` records (the exchange refused)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.grant.test_one_statement import (
    ISSUER,
    _counted,
    _decision,
    _reference,
    _refusal,
    _stored,
)
from trustplane.audit import sink
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.errors import InvalidClientError
from trustplane.grant.outcomes import ConsumeJti, NotRevoked, Outcome
from trustplane.oauth.exchange.subject import revoked
from trustplane.protocol.replay import Replayed, ReplayUse, claim_all
from trustplane.ssf.receiver import Derivations
from trustplane.storage.db import Database

pytestmark = pytest.mark.postgres


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


def _exchanges(subjects: list[str]) -> list[Outcome]:
    """One exchange per subject token ``jti``: the client assertion's jti, the subject token not
    revoked, an issuance the derivation index indexes, a decision."""
    outcomes = []
    for i, subject in enumerate(subjects):
        payload = {"exchange": {"subject_token": {"iss": ISSUER, "jti": subject}}, "exp": 2**31}
        event = AuditEvent(
            type=AuditEventType.TOKEN_ISSUED,
            issuer=ISSUER,
            client_id="c",
            jti=f"t{i}",
            decision="allow",
            payload=payload,
        )
        conditions = (
            ConsumeJti(ReplayUse("client-a", f"j{i}", 2**40), InvalidClientError()),
            NotRevoked(subject, revoked),
        )
        outcomes.append(
            Outcome(
                event=event,
                refused=_refusal(i),
                conditions=conditions,
                decisions=(_decision(i),),
            )
        )
    return outcomes


async def _revoke(db: Database, jti: str) -> None:
    async with db.transaction() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO revoked_tokens (jti, client_id, expires_at, revoked_at) "
            "VALUES ($1, 'c', $2, 0)",
            (jti, 2**40),
        )


async def test_a_batch_of_exchanges_is_one_statement(db: Database, observed: Any) -> None:
    """Fails on the old code: ``BEGIN``, the upsert with the inputs, the revocation query, the
    ledger insert, the derivation insert, ``COMMIT``."""
    await _revoke(db, "someone-else")
    writer, sent = await _counted(db)
    try:
        outcomes = _exchanges([f"s{i}" for i in range(6)])
        expected, reference = await _reference(db, outcomes)
        failed = await asyncio.gather(*(writer.submit("token_outcome", o) for o in outcomes))
    finally:
        await writer.stop()

    assert sent == ["WITH"]
    assert failed == expected == [None] * 6
    assert await _stored(db) == reference
    assert [jti for jti, _, _ in reference[3]] == [f"t{i}" for i in range(6)]


async def test_a_revoked_subject_token_fails_the_statement_and_its_exchange_is_refused(
    db: Database, observed: Any
) -> None:
    await _revoke(db, "s2")
    writer, sent = await _counted(db)
    outcomes = _exchanges(["s0", "s1", "s2", "s3"])
    expected, reference = await _reference(db, outcomes)
    try:
        failed = await asyncio.gather(*(writer.submit("token_outcome", o) for o in outcomes))
    finally:
        await writer.stop()

    assert failed == expected == [None, None, outcomes[2].conditions[1], None]
    assert failed[2] is not None
    assert failed[2].error.error == "invalid_request"
    # the failed statement, then the transaction (its derivation insert among the INSERTs)
    assert sent.count("WITH") == 2
    assert sent.count("BEGIN") == sent.count("COMMIT") == 1
    assert await _stored(db) == reference
    derived = [jti for jti, _, _ in reference[3]]
    assert derived == ["t0", "t1", "t3"]  # nothing indexed for the refused exchange


async def test_claim_all_reads_a_revocation_committed_before_it(db: Database) -> None:
    """Nothing of the statement is kept: the jti is not claimed (the transactional path that
    follows claims it and records the refusal)."""
    await _revoke(db, "gone")
    async with db.autocommit_engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        with pytest.raises(Replayed):
            await claim_all(driver, [ReplayUse("client-a", "j0", 2**40)], [], ["fine", "gone"])
        await claim_all(driver, [ReplayUse("client-a", "j1", 2**40)], [], ["fine"])

    _, _, used, _ = await _stored(db)
    assert [jti for _, jti, _ in used] == ["j1"]
