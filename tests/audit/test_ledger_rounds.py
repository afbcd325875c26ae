"""What a sequencer round sends: no "anything pending?" read between full batches, and on
PostgreSQL a small round in a few statements that do not send the entries back to the server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import asyncpg.connection
import asyncpg.prepared_stmt
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import text

from tests.audit.ledger_helpers import append, event, export
from trustplane.app import Services
from trustplane.audit import merkle
from trustplane.audit.export_verifier import verify_export
from trustplane.audit.ledger import Ledger
from trustplane.storage.db import Database


def _is_pending_read(query: str) -> bool:
    """SQLite's ``SELECT 1 FROM audit_pending LIMIT 1``, PostgreSQL's through the key (``ORDER BY
    id LIMIT 1``)."""
    return query.startswith("SELECT 1 FROM audit_pending") and query.endswith("LIMIT 1")


def _pending_reads(db: Database) -> list[str]:
    """The "anything pending?" reads either engine runs from now on."""
    seen: list[str] = []
    logged: set[int] = set()

    def record(*args: Any) -> None:
        if _is_pending_read(str(args[2])):
            seen.append(str(args[2]))

    def checkout(dbapi_conn: Any, *_args: Any) -> None:  # PostgreSQL: the poll is on asyncpg
        driver = getattr(dbapi_conn, "driver_connection", None)
        if db.dialect == "postgresql" and driver is not None and id(driver) not in logged:
            logged.add(id(driver))
            driver.add_query_logger(
                lambda r: seen.append(r.query) if _is_pending_read(r.query) else None
            )

    for engine in (db.engine, db.autocommit_engine):
        sa_event.listen(engine.sync_engine, "before_cursor_execute", record)
        sa_event.listen(engine.sync_engine, "checkout", checkout)
    return seen


async def test_no_pending_read_between_full_batches(services: Services) -> None:
    """A batch that was full says more is pending: the next batch is read at once. Three
    batches (10, 10, 5), one "anything pending?" read (the old code: one before each)."""
    await services.ledger.integrate_all()  # what start-up wrote
    settings = services.settings.model_copy(update={"audit_integrate_batch": 10})
    ledger = Ledger(settings, services.db, services.ledger._kek)
    await append(services.db, [event(i) for i in range(25)])
    reads = _pending_reads(services.db)
    assert await ledger.integrate_all() == 25
    assert len(reads) == 1
    # a backlog of exactly two batches: the third read finds nothing and writes nothing
    await append(services.db, [event(i) for i in range(20)])
    del reads[:]
    assert await ledger.integrate_all() == 20
    assert len(reads) == 1
    ledger._backlog = True  # told wrongly that more is pending: still nothing written
    assert await ledger.integrate() is None
    records, note = await export(services.ledger)
    assert verify_export(records, note, await services.ledger.verifier_key()).ok


class _Sent:
    """Every statement asyncpg sends on any connection, with its parameters: the connection's own
    calls (its query logger, added at checkout) and SQLAlchemy's prepared statements."""

    def __init__(self, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []
        logged: set[int] = set()

        def checkout(dbapi_conn: Any, *_args: Any) -> None:
            driver = dbapi_conn.driver_connection
            if id(driver) not in logged:
                logged.add(id(driver))
                driver.add_query_logger(lambda r: self.sent.append((r.query, tuple(r.args or ()))))

        for engine in (db.engine, db.autocommit_engine):
            sa_event.listen(engine.sync_engine, "checkout", checkout)
        cls: Any = asyncpg.prepared_stmt.PreparedStatement
        plain = cls._PreparedStatement__do_execute
        sent = self.sent

        async def counted(stmt: Any, executor: Any) -> Any:
            sent.append((stmt.get_query(), ()))
            return await plain(stmt, executor)

        monkeypatch.setattr(cls, "_PreparedStatement__do_execute", counted)

    def params(self) -> Iterator[Any]:
        for _, args in self.sent:
            yield from args


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_on_postgresql_a_round_of_five_is_seven_statements_without_the_entries(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pending read, BEGIN, the lock, the state with the pending ids and entries (the
    frontier is the one this process's last batch left), one statement moving the pending rows
    into leaves and payloads with their nodes, one storing the state and the checkpoint, COMMIT
    (the old code: 13, the entries, payloads and salts sent back as parameters). The leaves are
    the entries the hashes were computed from."""
    ledger = services.ledger
    await ledger.integrate_all()  # what start-up wrote
    before = await ledger.checkpoint()
    assert before is not None
    await append(services.db, [event(i) for i in range(5)])
    async with services.db.transaction() as conn:  # the pool's connection, logged from here on
        await conn.exec_driver_sql("SELECT 1")
    sent = _Sent(services.db, monkeypatch)
    assert await ledger.integrate_all() == 5
    assert len(sent.sent) <= 7, [q for q, _ in sent.sent]
    records, note = await export(ledger)
    for record in records[before.size :]:
        assert not [p for p in sent.params() if isinstance(p, str) and record["entry"]["jti"] in p]
    assert verify_export(records, note, await ledger.verifier_key()).ok
    leaf_hashes = [base64.b64decode(r["leaf_hash"]) for r in records]
    latest = await ledger.checkpoint()
    assert latest is not None
    assert merkle.root_of(leaf_hashes) == (latest.size, latest.root)
    # the leaf columns the server took from the entries are the entries' own
    async with services.db.read() as conn:
        rows = (
            await conn.exec_driver_sql(
                "SELECT idx, event_id, type, time_ms, subject, client_id, partner, "
                "transaction_id FROM audit_leaves WHERE idx >= $1 ORDER BY idx",
                (before.size,),
            )
        ).all()
    assert len(rows) == 5
    for row, record in zip(rows, records[before.size :], strict=True):
        e = record["entry"]
        assert tuple(row) == (
            record["index"],
            e["event_id"],
            e["type"],
            e["time"],
            e.get("subject"),
            e.get("client_id"),
            e.get("partner"),
            e.get("transaction_id"),
        )


async def test_a_batch_after_another_process_integrated_reads_the_tree_edge_afresh(
    services: Services,
) -> None:
    """A sequencer keeps the right edge of the tree its last batch committed; when another
    process has integrated since (the size moved), it reads the edge of the new size: the log
    stays one tree whose root the export recomputes."""
    first = services.ledger
    await first.integrate_all()  # what start-up wrote
    other = Ledger(services.settings, services.db, services.ledger._kek)
    for n, ledger in enumerate([first, other, first, first, other, first]):
        await append(services.db, [event(10 * n + i) for i in range(n + 3)])
        done = await ledger.integrate()
        assert done is not None
        assert done.count == n + 3
    records, note = await export(services.ledger)
    assert verify_export(records, note, await services.ledger.verifier_key()).ok
    latest = await services.ledger.checkpoint()
    assert latest is not None
    leaf_hashes = [base64.b64decode(r["leaf_hash"]) for r in records]
    assert merkle.root_of(leaf_hashes) == (latest.size, latest.root)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_on_postgresql_only_a_slice_holding_a_nul_escape_is_searched_for_it(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sequencer sees the entries while it hashes them: a slice none of whose entries holds
    the text ``\\u0000`` is moved with the statement that parses each entry as it is; only a
    slice that holds one gets the statement that searches each entry for NUL escapes on the
    server (``strpos``, ~2.8 us of PostgreSQL's CPU per entry) and replaces them."""
    from trustplane.audit import store

    ledger = services.ledger
    await ledger.integrate_all()  # what start-up wrote
    plain = [event(i) for i in range(store.INSERT_SLICE)]
    odd = [event(store.INSERT_SLICE, subject="desk\x00one"), event(store.INSERT_SLICE + 1)]
    await append(services.db, [*plain, *odd])
    async with services.db.transaction() as conn:  # the pool's connection, logged from here on
        await conn.exec_driver_sql("SELECT 1")
    sent = _Sent(services.db, monkeypatch)
    assert await ledger.integrate_all() == store.INSERT_SLICE + 2
    moves = [q for q, _ in sent.sent if "INSERT INTO audit_leaves" in q]
    assert moves == [store.PG_SLICE_SQL, store.PG_SLICE_NUL_SQL]
    assert "strpos" not in store.PG_SLICE_SQL
    records, note = await export(ledger)
    assert verify_export(records, note, await ledger.verifier_key()).ok
    assert records[-2]["entry"]["subject"] == "desk\x00one"


async def test_an_entry_holding_a_nul_character_is_integrated(services: Services) -> None:
    """A NUL character that reached an event (a request's field, escaped ``\\u0000`` in the
    canonical entry) does not stop the sequencer: PostgreSQL's JSON types refuse that escape, so
    the leaf columns taken from such an entry on the server hold U+FFFD in its place (a text
    column cannot hold NUL at all); the entry itself, hashed and proved, is unchanged. Before, the
    round failed and was retried for ever, and nothing after that entry was integrated."""
    ledger = services.ledger
    await ledger.integrate_all()  # what start-up wrote
    before = await ledger.checkpoint()
    assert before is not None
    odd = [
        event(1, subject="desk\x00one", transaction_id="txn-\x00"),
        event(2, jti="jti-\x00-2"),  # in a field that is no leaf column
        event(3, subject="back\\u0000slash"),  # the escape's text itself, not a NUL
    ]
    await append(services.db, [event(0), *odd, event(4)])
    assert await ledger.integrate_all() == 5
    records, note = await export(ledger)
    assert verify_export(records, note, await ledger.verifier_key()).ok
    entries = [r["entry"] for r in records[before.size :]]
    assert [e["subject"] for e in entries[1:4]] == ["desk\x00one", "client-2", "back\\u0000slash"]
    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT subject, transaction_id FROM audit_leaves WHERE idx >= :n ORDER BY idx"
                ),
                {"n": before.size},
            )
        ).all()
    nul = "\ufffd"  # on SQLite too (``tables.leaf_value``): the filters map a NUL the same way
    assert [tuple(r) for r in rows] == [
        ("client-0", "txn-0"),
        (f"desk{nul}one", f"txn-{nul}"),
        ("client-2", "txn-2"),
        ("back\\u0000slash", "txn-3"),
        ("client-4", "txn-4"),
    ]
