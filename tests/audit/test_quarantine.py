"""One pending entry the sequencer cannot integrate must not stop the ledger (docs/ledger.md,
"Quarantine"): values longer than a leaf column are stored as their digest in the column (the entry
keeps them whole); an entry no integration can store is quarantined, a placeholder leaf in its
place, and the entries after it are integrated. On PostgreSQL before this, every integration after
such an entry failed with "value too long"."""

from __future__ import annotations

import dataclasses
import hashlib

import asyncpg
import orjson
import pytest
from sqlalchemy import select, text

from tests.audit.ledger_helpers import append, event, export
from tests.policy.conftest import REPO_POLICIES, client, order_request
from trustplane.app import Services
from trustplane.audit import store
from trustplane.audit.canonical import EntryError
from trustplane.audit.export_verifier import verify_export
from trustplane.audit.ledger import QUARANTINED, Ledger
from trustplane.audit.tables import audit_leaves, audit_quarantine, leaf_value
from trustplane.audit_events import AuditEventType
from trustplane.errors import InvalidClientError
from trustplane.grant.outcomes import ConsumeJti, Outcome
from trustplane.policy.bundle import compile_bundle, load_dir
from trustplane.policy.engine import PolicyEngine
from trustplane.policy.recorder import DecisionRecorder
from trustplane.protocol.replay import ReplayUse
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter

LONG_SUBJECT = "s" * 300  # audit_leaves.subject is 256 characters
LONG_CLIENT = "c" * 200  # client_id and transaction_id: 128
LONG_TXN = "t" * 129


async def _leaf_rows(db: Database, after: int) -> list[dict[str, object]]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(audit_leaves).where(audit_leaves.c.idx >= after).order_by(audit_leaves.c.idx)
        )
        return [dict(r) for r in rows.mappings().all()]


async def _size(ledger: Ledger) -> int:
    checkpoint = await ledger.checkpoint()
    assert checkpoint is not None
    return checkpoint.size


async def _verified_export(ledger: Ledger, placeholders: int = 0) -> list[dict[str, object]]:
    """The whole log, verified offline; ``placeholders``: the quarantine placeholders the report
    must name as not proved."""
    records, note = await export(ledger)
    report = verify_export(records, note, await ledger.verifier_key())
    assert report.ok, report
    named = [line for line in report.not_proved if "quarantine placeholders" in line]
    assert named == ([] if not placeholders else [named[0]])
    if placeholders:
        assert named[0].startswith(f"{placeholders} entries are quarantine placeholders")
    return records


async def test_overlong_leaf_fields_are_integrated_as_digests(services: Services) -> None:
    """An entry whose subject, client id, transaction id and partner are longer than their leaf
    columns is integrated (the columns hold ``sha256:`` digests, the entry the whole values) and so
    is the entry after it; the filters find it by its whole value; the export verifies."""
    ledger, db = services.ledger, services.db
    await ledger.integrate_all()
    start = await _size(ledger)
    long = event(
        1,
        subject=LONG_SUBJECT,
        client_id=LONG_CLIENT,
        transaction_id=LONG_TXN,
        partner="p" * 257,
    )
    await append(db, [long, event(2, jti="after-the-long-one")])
    assert await ledger.integrate_all() == 2
    first, second = await _leaf_rows(db, start)
    digest = "sha256:" + hashlib.sha256(LONG_SUBJECT.encode()).hexdigest()
    assert first["subject"] == digest
    assert (
        first["client_id"] == ("sha256:" + hashlib.sha256(LONG_CLIENT.encode()).hexdigest())[:128]
    )
    assert first["transaction_id"] == leaf_value(LONG_TXN, 128)
    assert orjson.loads(str(first["entry"]))["subject"] == LONG_SUBJECT
    assert orjson.loads(str(second["entry"]))["jti"] == "after-the-long-one"
    _, found = await ledger.search({"subject": LONG_SUBJECT})
    assert [p.entry.index for p in found] == [start]
    _, found = await ledger.search({"transaction_id": LONG_TXN, "client_id": LONG_CLIENT})
    assert [p.entry.index for p in found] == [start]
    assert len(await _verified_export(ledger)) == start + 2


async def test_a_policy_decision_with_an_overlong_subject_does_not_stop_the_ledger(
    services: Services,
) -> None:
    """The AuthZEN engine's recorder (``policy.recorder``, the group-commit writer's own SQL)
    records a decision about a client whose id is longer than the columns; it and the entries after
    it are integrated."""
    ledger, db = services.ledger, services.db
    await ledger.integrate_all()
    start = await _size(ledger)
    writer = GroupCommitWriter(db)
    engine = PolicyEngine(
        issuer="https://as.test", served_regions=["eu"], recorder=DecisionRecorder(writer)
    )
    engine.activate(compile_bundle(load_dir(REPO_POLICIES)))
    writer.start()
    try:
        request = dataclasses.replace(
            order_request(subject=client(LONG_CLIENT * 2)), transaction_id=LONG_TXN
        )
        [decision] = await engine.decide_many([request])
    finally:
        await writer.stop()
    await append(db, [event(3, jti="after-the-decision")])
    assert await ledger.integrate_all() == 2
    first, second = await _leaf_rows(db, start)
    assert first["event_id"] == decision.decision_id
    assert first["client_id"] == leaf_value(LONG_CLIENT * 2, 128)
    assert first["transaction_id"] == leaf_value(LONG_TXN, 128)
    assert orjson.loads(str(second["entry"]))["jti"] == "after-the-decision"
    await _verified_export(ledger)


async def test_a_token_outcome_with_overlong_fields_does_not_stop_the_ledger(
    services: Services,
) -> None:
    """The token endpoint's one durable write (``grant.outcomes``, its own SQL into the pending
    table: on PostgreSQL a CTE of the ``jti`` upsert) records an issue whose subject, client id and
    transaction id are longer than the columns; it and the entry after it are integrated."""
    ledger, db = services.ledger, services.db
    await ledger.integrate_all()
    start = await _size(ledger)
    issued = event(
        1,
        subject=LONG_SUBJECT,
        client_id=LONG_CLIENT,
        transaction_id=LONG_TXN,
        jti="overlong-issue",
    )
    outcome = Outcome(
        event=issued,
        refused=lambda error: event(2, decision="deny", reason=error.error),
        conditions=(ConsumeJti(ReplayUse(LONG_CLIENT, "a-jti", 2**40), InvalidClientError()),),
    )
    assert await services.writer.submit("token_outcome", outcome) is None
    await append(db, [event(3, jti="after-the-issue")])
    assert await ledger.integrate_all() == 2
    first, second = await _leaf_rows(db, start)
    assert first["event_id"] == issued.event_id
    assert first["subject"] == leaf_value(LONG_SUBJECT, 256)
    assert first["client_id"] == leaf_value(LONG_CLIENT, 128)
    assert first["transaction_id"] == leaf_value(LONG_TXN, 128)
    assert orjson.loads(str(second["entry"]))["jti"] == "after-the-issue"
    await _verified_export(ledger)


async def _raw_pending(db: Database, entry: str) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            text("INSERT INTO audit_pending (entry, payload, salt) VALUES (:e, '{}', :s)"),
            {"e": entry, "s": b"\x00" * 16},
        )


@pytest.mark.parametrize(
    ("entry", "errors"),
    [
        (
            '{"type":"x","time":1}',  # no event_id
            {"sqlite": "EntryError", "postgresql": "NotNullViolationError (23502)"},
        ),
        (
            "not json",
            {"sqlite": "JSONDecodeError", "postgresql": "InvalidTextRepresentationError (22P02)"},
        ),
    ],
)
async def test_an_entry_no_integration_can_store_is_quarantined(
    services: Services, entry: str, errors: dict[str, str]
) -> None:
    """A pending row that no integration can store (written past the append path) is moved to
    ``audit_quarantine`` as it was; a placeholder leaf takes its place in the sequence, committing
    to its digests; the entries before and after it are integrated in order; the metric counts
    it; the export (placeholder included) verifies offline."""
    ledger, db = services.ledger, services.db
    await ledger.integrate_all()
    start = await _size(ledger)
    before = QUARANTINED._value.get()
    await append(db, [event(1, jti="before")])
    await _raw_pending(db, entry)
    await append(db, [event(2, jti="after")])
    assert await ledger.integrate_all() == 3
    assert await _size(ledger) == start + 3
    assert QUARANTINED._value.get() == before + 1
    rows = await _leaf_rows(db, start)
    bodies = [orjson.loads(str(r["entry"])) for r in rows]
    assert [b.get("jti") for b in bodies] == ["before", None, "after"]
    placeholder = bodies[1]
    assert placeholder["type"] == AuditEventType.AUDIT_ENTRY_QUARANTINED.value
    entry_digest = hashlib.sha256(entry.encode()).hexdigest()
    assert f"entry_sha256={entry_digest}" in placeholder["reason_ids"]
    error = errors["sqlite" if db.is_sqlite else "postgresql"]
    assert placeholder["reason"] == error
    async with db.read() as conn:
        [quarantined] = (await conn.execute(select(audit_quarantine))).mappings().all()
    assert quarantined["entry"] == entry
    assert quarantined["event_id"] == placeholder["event_id"]
    assert f"pending_id={quarantined['pending_id']}" in placeholder["reason_ids"]
    assert await ledger.quarantined() == 1
    records = await _verified_export(ledger, placeholders=1)
    assert len(records) == start + 3


async def test_a_placeholder_is_never_quarantined(services: Services) -> None:
    """A failure that the placeholder meets too is the sequencer's, not an entry's: it is raised
    and the placeholder stays pending (nothing is quarantined twice)."""
    ledger, db = services.ledger, services.db
    await ledger.integrate_all()
    placeholder = orjson.dumps({"type": AuditEventType.AUDIT_ENTRY_QUARANTINED.value}).decode()
    await _raw_pending(db, placeholder)
    expected = EntryError if db.is_sqlite else asyncpg.NotNullViolationError
    with pytest.raises(expected):
        await ledger.integrate_all()
    async with db.read() as conn:
        assert await store.count_pending(conn) == 1
    assert await ledger.quarantined() == 0


async def test_nul_and_unpaired_surrogates_do_not_stop_the_ledger(services: Services) -> None:
    """A NUL (no PostgreSQL text can hold one) and an unpaired surrogate (not UTF-8) in the leaf
    fields and the payload: the entry is integrated (the surrogate as U+FFFD, the NUL escaped in
    the entry and U+FFFD in the leaf column), so is the one after it, and the export verifies."""
    ledger, db = services.ledger, services.db
    await ledger.integrate_all()
    start = await _size(ledger)
    odd = event(
        1,
        subject="a\x00b\ud800c",
        client_id="x" * 127 + "\x00",
        transaction_id="\ud800" * 129,
        payload={"note": "n\x00\udfff", "k\ud800": 1},
    )
    await append(db, [odd, event(2, jti="after-the-odd-one")])
    assert await ledger.integrate_all() == 2
    first, second = await _leaf_rows(db, start)
    assert first["subject"] == "a\ufffdb\ufffdc"
    assert first["client_id"] == "x" * 127 + "\ufffd"
    assert first["transaction_id"] == leaf_value("\ufffd" * 129, 128)
    assert orjson.loads(str(first["entry"]))["subject"] == "a\x00b\ufffdc"
    assert orjson.loads(str(second["entry"]))["jti"] == "after-the-odd-one"
    _, found = await ledger.search({"subject": "a\x00b\ufffdc"})
    assert [p.entry.index for p in found] == [start]
    await _verified_export(ledger)


async def test_two_bad_entries_among_good_ones_are_each_quarantined_in_place(
    services: Services,
) -> None:
    """Each bad entry gets its own placeholder at its own place; every good entry is integrated,
    in the order appended."""
    ledger, db = services.ledger, services.db
    await ledger.integrate_all()
    start = await _size(ledger)
    await append(db, [event(n, jti=f"good-{n}") for n in range(3)])
    await _raw_pending(db, "not json")
    await append(db, [event(3, jti="good-3")])
    await _raw_pending(db, "[]")
    await append(db, [event(n, jti=f"good-{n}") for n in range(4, 7)])
    assert await ledger.integrate_all() == 9
    bodies = [orjson.loads(str(r["entry"])) for r in await _leaf_rows(db, start)]
    kinds = [b["jti"] if b.get("jti") else b["type"] for b in bodies]
    placeholder = AuditEventType.AUDIT_ENTRY_QUARANTINED.value
    assert kinds == [
        *(f"good-{n}" for n in range(3)),
        placeholder,
        "good-3",
        placeholder,
        *(f"good-{n}" for n in range(4, 7)),
    ]
    assert await ledger.quarantined() == 2
    await _verified_export(ledger, placeholders=2)
