"""The learning transaction on PostgreSQL in one round trip: a PL/pgSQL function, ``ref_learn``,
that the store creates with its tables and calls as one statement on the autocommit engine.

Python (:meth:`TradeStore._learn_one`) is the reference of what the transaction does; on SQLite it
runs as written. On PostgreSQL those nine statements and ``BEGIN``/``COMMIT`` were eleven round
trips per (event, downstream store), each through SQLAlchemy's compilation and cursor layers: most
of a service's CPU per request went into handing its event to the three other stores. The
function runs the same statements, in the same order, in the statement's own transaction: each
statement of a ``VOLATILE`` function takes a fresh snapshot (READ COMMITTED), so the look for
kept events after the inbox's append lock sees what committed before the lock was granted, as
the Python transaction's separate statement does. A unique violation (a racing delivery of the
event, or a transition already recorded) aborts the whole statement, as it rolled back the
Python transaction. The branch-specific values (the order's fields of a ``create``, the
allocation, the instructions, the exception count) are computed in Python from the verified
claims, once, exactly as for SQLite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util import greenlet_spawn

from trustplane.reference.driver_connections import connections_of
from trustplane.storage.db import Database

#: Bumped with any change of the function's text: the name carries it, so that processes of two
#: versions running at once on one database each call their own.
LEARN_FUNCTION = "ref_learn_v2"

# v2 (2026-12-06): ``p_keep_jws``: a store that does not serve the feed (an owner's) keeps the
# signed event in its inbox row only while the event waits for its predecessor (its retry reads
# it); an event applied on arrival gets a row without it (docs/settlement.md, "Stores").

_LEARN = f"""\
CREATE OR REPLACE FUNCTION {LEARN_FUNCTION}(
    p_event_id text, p_trade_id text, p_transition text, p_source text, p_target text,
    p_mode text, p_order text[], p_txn text, p_envelope text,
    p_set text, p_allocation text, p_proposer text, p_settlement text,
    p_actor text, p_token_iss text, p_token_jti text, p_mandate_id text,
    p_issuer text, p_type text, p_jws text, p_now bigint,
    p_consumer text, p_seq integer, p_lock bigint, p_keep_jws boolean
) RETURNS TABLE (outcome text, moved boolean, waiting boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_seen boolean;
    v_applied_at bigint;
    v_applied boolean := false;
    v_moved boolean := false;
    v_waiting boolean := false;
BEGIN
    SELECT true, i.applied_at INTO v_seen, v_applied_at
        FROM ref_inbox i WHERE i.event_id = p_event_id;
    IF v_seen AND v_applied_at IS NOT NULL THEN
        v_applied := true;
    ELSIF p_mode = 'escalated' THEN
        v_applied := true;
    ELSIF EXISTS (SELECT 1 FROM ref_transitions t
                  WHERE t.trade_id = p_trade_id AND t.transition = p_transition) THEN
        v_applied := true;
    ELSIF p_target IS NOT NULL AND (p_mode = 'create' OR p_source IS NOT NULL) THEN
        IF p_mode = 'create' THEN
            INSERT INTO ref_trades (trade_id, state, account, instrument, side, quantity, amount,
                currency, txn, envelope, exceptions, version, created_at, updated_at)
            VALUES (p_trade_id, p_target, p_order[1], p_order[2], p_order[3], p_order[4],
                p_order[5], p_order[6], p_txn, p_envelope, 0, 1, p_now, p_now);
            v_applied := true;
        ELSE
            UPDATE ref_trades t SET state = p_target, version = t.version + 1,
                updated_at = p_now,
                allocation = CASE WHEN p_set = 'allocation' THEN p_allocation
                                  ELSE t.allocation END,
                proposer = CASE WHEN p_set = 'allocation' THEN p_proposer ELSE t.proposer END,
                settlement = CASE WHEN p_set = 'settlement' THEN p_settlement
                                  ELSE t.settlement END,
                exceptions = t.exceptions + CASE WHEN p_set = 'exception' THEN 1 ELSE 0 END
            WHERE t.trade_id = p_trade_id AND t.state = p_source;
            v_applied := FOUND;
        END IF;
        IF v_applied THEN
            INSERT INTO ref_transitions (trade_id, transition, source, target, actor,
                idempotency_key, event_id, at, token_iss, token_jti, mandate_id)
            VALUES (p_trade_id, left(p_transition, 64), p_source, p_target, p_actor, NULL,
                left(p_event_id, 36), p_now, p_token_iss, p_token_jti, p_mandate_id);
        END IF;
    END IF;
    IF p_consumer IS NOT NULL THEN
        UPDATE ref_cursors c SET seq = p_seq, updated_at = p_now
            WHERE c.consumer = p_consumer AND c.seq < p_seq;
        v_moved := FOUND;
    END IF;
    IF v_seen AND v_applied_at IS NOT NULL THEN
        RETURN QUERY SELECT 'known'::text, v_moved, false;
        RETURN;
    END IF;
    IF v_seen IS NULL THEN
        PERFORM pg_advisory_xact_lock(p_lock);
        INSERT INTO ref_inbox (event_id, issuer, type, trade_id, transition, jws, received_at,
            applied_at)
        VALUES (left(p_event_id, 64), p_issuer, p_type, left(p_trade_id, 64),
            left(p_transition, 64), CASE WHEN p_keep_jws OR NOT v_applied THEN p_jws END,
            p_now, CASE WHEN v_applied THEN p_now END);
    ELSIF v_applied THEN
        UPDATE ref_inbox i SET applied_at = p_now WHERE i.event_id = p_event_id;
        PERFORM pg_advisory_xact_lock(p_lock);
    END IF;
    IF v_applied THEN
        v_waiting := EXISTS (SELECT 1 FROM ref_inbox i WHERE i.trade_id = p_trade_id
            AND i.applied_at IS NULL AND i.event_id <> p_event_id);
    END IF;
    RETURN QUERY SELECT CASE WHEN v_applied THEN 'applied' ELSE 'pending' END, v_moved,
        v_waiting;
END
$fn$"""  # noqa: S608 - constants

#: Several events learned by one store in one statement (one transaction, one commit): the
#: learning function called for each, in order (the parameters of each call a JSON array, in the
#: function's order; the cursor's only in the last), each call's statements seeing the ones before
#: (a creation, then the step that follows it). A unique violation anywhere aborts all of it, as
#: for one call: the caller learns them one by one then.
LEARN_ALL_FUNCTION = "ref_learn_all_v2"  # v2: calls ref_learn_v2

_LEARN_ALL = f"""\
CREATE OR REPLACE FUNCTION {LEARN_ALL_FUNCTION}(p_events jsonb)
RETURNS TABLE (outcome text, moved boolean, waiting boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    e jsonb;
BEGIN
    FOR e IN SELECT x.value FROM jsonb_array_elements(p_events) WITH ORDINALITY AS x(value, n)
             ORDER BY x.n LOOP
        RETURN QUERY SELECT * FROM {LEARN_FUNCTION}(
            e->>0, e->>1, e->>2, e->>3, e->>4, e->>5,
            CASE WHEN jsonb_typeof(e->6) = 'array' THEN ARRAY(
                SELECT o.value FROM jsonb_array_elements_text(e->6) WITH ORDINALITY AS o(value, n)
                ORDER BY o.n) END,
            e->>7, e->>8, e->>9, e->>10, e->>11, e->>12, e->>13, e->>14, e->>15, e->>16,
            e->>17, e->>18, e->>19, (e->>20)::bigint, e->>21, (e->>22)::integer,
            (e->>23)::bigint, (e->>24)::boolean);
    END LOOP;
END
$fn$"""  # noqa: S608 - constants

#: The owner's transition (or creation), its transition row, its outbox row and, for a request
#: with an Idempotency-Key stored in the transaction (``pep.idempotency.InTransaction``), the
#: key's completed answer, in one statement: the same compare-and-set, the same unique
#: (trade_id, transition), the outbox row last under its append lock.
#:
#: - The key first (the SDK's ``put``, same conditions: no row, an expired one, an abandoned
#:   claim of the same payload, or this call's own token): held by a live row, nothing is written
#:   and the row is returned (the caller answers with it: a replay, 422 or 409). Of concurrent
#:   requests with one key, the second waits on the first's row and then finds it held.
#: - The compare-and-set matched nothing: the key's row is deleted again (nothing written) and
#:   ``moved`` is false (the caller reads why).
#: - A call whose transition is already recorded with this call's event id is a retry of this
#:   very call after its commit (the connection dropped before the answer): ``moved``, as the
#:   first attempt answered, and nothing written again.
#: - ``o_seq``: the outbox ``seq`` the event took (None when nothing was written by this call),
#:   so that the process can hand its own event off without reading it back (``handoff.py``).
APPLY_FUNCTION = "ref_apply_v4"

# v4 (2026-12-06): the look for this call's own committed transition only where a retry needs it
# (before a creation's insert or a move onto its own state; after any other move's compare-and-set
# matched nothing, before the key is deleted), not before every call, and the result row returned
# with ``RETURN NEXT`` (no query).
_APPLY = f"""\
CREATE OR REPLACE FUNCTION {APPLY_FUNCTION}(
    p_trade_id text, p_source text, p_target text, p_order text[], p_envelope text,
    p_allocation text[], p_settlement text[],
    p_transition text, p_actor text, p_key text, p_event_id text,
    p_token_iss text, p_token_jti text, p_mandate_id text,
    p_type text, p_txn text, p_jws text, p_now bigint, p_lock bigint,
    p_scope text, p_fingerprint text, p_claim text, p_expires bigint,
    p_status integer, p_body bytea, p_content_type text, p_location text
) RETURNS TABLE (moved boolean, k_fingerprint text, k_state text, k_lease_until bigint,
    k_expires_at bigint, k_status integer, k_body bytea, k_content_type text, k_location text,
    o_seq integer)
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    moved := true;
    -- a creation's insert, or a move onto its own state (amend#n), would succeed or fail again
    -- on a retry: look first; any other move's compare-and-set matches nothing after its commit
    -- (the condition apart from the look: with it in one expression, the custom plans left the
    -- look out and looked cheaper than the generic one, so each call was planned again)
    IF p_order IS NOT NULL OR p_source = p_target THEN
        IF EXISTS (SELECT 1 FROM ref_transitions t WHERE t.trade_id = p_trade_id
                   AND t.transition = p_transition AND t.event_id = p_event_id) THEN
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    IF p_scope IS NOT NULL THEN
        INSERT INTO pep_idempotency_keys AS k (scope, "key", fingerprint, state, claim_token,
            lease_until, expires_at, status, body, content_type, location)
        VALUES (p_scope, p_key, p_fingerprint, 'completed', p_claim, p_now, p_expires,
            p_status, p_body, p_content_type, p_location)
        ON CONFLICT (scope, "key") DO UPDATE SET
            fingerprint = excluded.fingerprint, state = 'completed',
            claim_token = excluded.claim_token, lease_until = excluded.lease_until,
            expires_at = excluded.expires_at, status = excluded.status,
            content_type = excluded.content_type, location = excluded.location,
            body = excluded.body
        WHERE k.expires_at <= p_now
            OR (k.state = 'in_progress' AND k.lease_until <= p_now
                AND k.fingerprint = excluded.fingerprint)
            OR k.claim_token = excluded.claim_token;
        IF NOT FOUND THEN
            moved := false;
            SELECT k.fingerprint::text, k.state::text, k.lease_until, k.expires_at, k.status,
                    k.body, k.content_type::text, k.location
                INTO k_fingerprint, k_state, k_lease_until, k_expires_at, k_status, k_body,
                    k_content_type, k_location
                FROM pep_idempotency_keys k WHERE k.scope = p_scope AND k."key" = p_key;
            IF FOUND THEN
                RETURN NEXT;
            END IF;
            RETURN;
        END IF;
    END IF;
    IF p_order IS NOT NULL THEN
        INSERT INTO ref_trades (trade_id, state, account, instrument, side, quantity, amount,
            currency, txn, envelope, exceptions, version, created_at, updated_at)
        VALUES (p_trade_id, p_target, p_order[1], p_order[2], p_order[3], p_order[4],
            p_order[5], p_order[6], p_txn, p_envelope, 0, 1, p_now, p_now);
    ELSE
        UPDATE ref_trades t SET state = p_target, version = t.version + 1, updated_at = p_now,
            allocation = CASE WHEN p_allocation IS NULL THEN t.allocation
                              ELSE p_allocation[1] END,
            proposer = CASE WHEN p_allocation IS NULL THEN t.proposer ELSE p_allocation[2] END,
            settlement = CASE WHEN p_settlement IS NULL THEN t.settlement
                              ELSE p_settlement[1] END
        WHERE t.trade_id = p_trade_id AND t.state = p_source;
        IF NOT FOUND THEN
            -- a retry of this very call after its commit (its key, if any, was rewritten with
            -- the same values by its own token above): moved, as the first run answered
            IF EXISTS (SELECT 1 FROM ref_transitions t WHERE t.trade_id = p_trade_id
                       AND t.transition = p_transition AND t.event_id = p_event_id) THEN
                RETURN NEXT;
                RETURN;
            END IF;
            IF p_scope IS NOT NULL THEN
                DELETE FROM pep_idempotency_keys k WHERE k.scope = p_scope AND k."key" = p_key;
            END IF;
            moved := false;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    INSERT INTO ref_transitions (trade_id, transition, source, target, actor, idempotency_key,
        event_id, at, token_iss, token_jti, mandate_id)
    VALUES (p_trade_id, p_transition, p_source, p_target, p_actor, p_key, p_event_id, p_now,
        p_token_iss, p_token_jti, p_mandate_id);
    PERFORM pg_advisory_xact_lock(p_lock);
    INSERT INTO ref_outbox (event_id, type, trade_id, txn, jws, created_at)
    VALUES (p_event_id, p_type, p_trade_id, p_txn, p_jws, p_now)
    RETURNING seq INTO o_seq;
    RETURN NEXT;
END
$fn$"""  # noqa: S608 - constants


#: The publisher's mark of the rows JetStream acked (conditional: a row marked already keeps its
#: time) and, with ``p_limit`` > 0, its next read of the oldest rows not yet published after
#: ``p_after`` (the store's position: every row up to it is published), in one statement and one
#: commit. Both find their rows by the primary key on ``seq``, and cannot plan a sequential scan
#: (``SET enable_seqscan = off``, for the function's statements only): sent as prepared
#: statements, each connection planned them a few times and then kept a generic plan, made while
#: the outbox was a page or two: a sequential scan, never planned again without an ``ANALYZE``
#: (docs/settlement.md, "The publisher's marks"). No index holds ``published_at`` (nor has it in a
#: predicate), so the mark is an in-place (HOT) update on the row's page (the outbox's
#: :data:`~trustplane.reference.store.OUTBOX_FILLFACTOR` leaves it the room): no index entry, and
#: about a third of the WAL of an update that writes every index anew. The read runs after the
#: mark (the function's next statement sees it), so the rows just marked are not read again.
MARK_FUNCTION = "ref_mark_published_v2"

# v2 (2026-12-06): the read from the caller's position by the primary key (``p_after``), not by
# the partial index of the unpublished rows (dropped: its predicate made every mark an update that
# wrote all the outbox's indexes).
_MARK = f"""\
CREATE OR REPLACE FUNCTION {MARK_FUNCTION}(p_seqs integer[], p_now bigint, p_limit integer,
    p_after integer)
RETURNS SETOF ref_outbox
LANGUAGE plpgsql VOLATILE SET enable_seqscan = off AS $fn$
BEGIN
    IF cardinality(p_seqs) > 0 THEN
        UPDATE ref_outbox o SET published_at = p_now
            WHERE o.seq = ANY(p_seqs) AND o.published_at IS NULL;
    END IF;
    IF p_limit > 0 THEN
        RETURN QUERY SELECT * FROM ref_outbox o WHERE o.seq > p_after AND o.published_at IS NULL
            ORDER BY o.seq LIMIT p_limit;
    END IF;
END
$fn$"""  # noqa: S608 - constants


def _call(function: str, columns: str, count: int) -> str:
    parameters = ", ".join(f"${i}" for i in range(1, count + 1))
    return f"SELECT {columns} FROM {function}({parameters})"  # noqa: S608 - constants


_CALL = _call(LEARN_FUNCTION, "outcome, moved, waiting", 25)
_CALL_ALL = _call(LEARN_ALL_FUNCTION, "outcome, moved, waiting", 1)
_CALL_APPLY = _call(APPLY_FUNCTION, "*", 27)

#: Serializes the creation of the function by processes starting at once on one database
#: (``CREATE OR REPLACE FUNCTION`` racing itself fails with "tuple concurrently updated").
_CREATE_LOCK = int.from_bytes(b"tp-rflrn", "big") & 0x7FFF_FFFF_FFFF_FFFF

# A pooled connection the server (or the network) dropped fails with one of these (as in
# ``pep/idempotency_store.py``): the call is tried once more on a fresh connection.
_DISCONNECTS = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    OSError,
)


async def lock_schema(conn: AsyncConnection) -> None:
    """Hold the schema's creation lock until the transaction ends (taken again, harmlessly, by
    :func:`create_functions`)."""
    await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_CREATE_LOCK})")


async def create_functions(conn: AsyncConnection) -> None:
    """Create (or replace) the functions, in the schema's transaction."""
    await lock_schema(conn)
    await conn.exec_driver_sql(_LEARN)
    await conn.exec_driver_sql(_LEARN_ALL)
    await conn.exec_driver_sql(_APPLY)
    await conn.exec_driver_sql(_MARK)


class Duplicate(Exception):
    """The statement hit a unique constraint: a racing delivery of the event, or the transition
    recorded already, or the trade created already (the statement rolled back: nothing written)."""


async def learn(db: Database, params: tuple[Any, ...]) -> tuple[str, bool, bool]:
    """One call of the learning function, committed on its own: (outcome, moved, waiting)."""
    row = await _fetchrow(db, _CALL, params)
    return str(row[0]), bool(row[1]), bool(row[2])


async def learn_all(db: Database, calls: Sequence[tuple[Any, ...]]) -> list[tuple[str, bool, bool]]:
    """The learning function's ``calls``, in order, in one statement committed on its own: each
    call's (outcome, moved, waiting)."""
    events = orjson.dumps(list(calls)).decode()
    rows = await _on_driver(db, lambda driver: driver.fetch(_CALL_ALL, events))
    return [(str(r[0]), bool(r[1]), bool(r[2])) for r in rows]


async def apply(db: Database, params: tuple[Any, ...]) -> tuple[bool, Sequence[Any] | None]:
    """One call of the owner's transition function, committed on its own: whether it moved, and
    the row holding the request's Idempotency-Key when that stopped it (``fingerprint, state,
    lease_until, expires_at, status, body, content_type, location``; None otherwise)."""
    moved, held, _seq = await applied(db, params)
    return moved, held


async def applied(
    db: Database, params: tuple[Any, ...]
) -> tuple[bool, Sequence[Any] | None, int | None]:
    """:func:`apply`, and the outbox ``seq`` its event took (None when it wrote none)."""
    row = await _fetchrow(db, _CALL_APPLY, params)
    if row is None:  # the key's holder was deleted between the conflict and the read
        return False, None, None
    held = tuple(row[1:9]) if row[1] is not None else None
    return bool(row[0]), held, (int(row[9]) if row[9] is not None else None)


#: The hot reads: the trade before each step (its state for the PDP), and the outbox after each
#: commit (the hand-off), as the SQLAlchemy selects of ``TradeStore.trade`` and ``events_after``.
TRADE = "SELECT * FROM ref_trades WHERE trade_id = $1"
EVENTS_AFTER = "SELECT * FROM ref_outbox WHERE seq > $1 ORDER BY seq LIMIT $2"
#: The publisher's round: the oldest unpublished rows after the store's position, then the mark of
#: those JetStream acked (conditional, as ``TradeStore.mark_published``), alone (``p_limit`` 0) or
#: with the next round's read (the publisher of a woken outbox): :data:`MARK_FUNCTION`, the read
#: alone (no ``seq``), the mark alone, or both (one autocommit transaction).
UNPUBLISHED = f"SELECT * FROM {MARK_FUNCTION}('{{}}'::integer[], 0, $1, $2)"  # noqa: S608 - constants
MARK_PUBLISHED = f"SELECT * FROM {MARK_FUNCTION}($1::integer[], $2, 0, 0)"  # noqa: S608 - constants
MARK_THEN_UNPUBLISHED = f"SELECT * FROM {MARK_FUNCTION}($2::integer[], $3, $1, $4)"  # noqa: S608


async def fetch(db: Database, sql: str, params: tuple[Any, ...]) -> list[Any]:
    """The rows (asyncpg records: mappings by column name) of one read on the autocommit engine."""
    return list(await _on_driver(db, lambda driver: driver.fetch(sql, *params)))


async def execute(db: Database, sql: str, params: tuple[Any, ...]) -> None:
    """One write without rows on the autocommit engine (its own transaction)."""
    await _on_driver(db, lambda driver: driver.execute(sql, *params))


async def _fetchrow(db: Database, sql: str, params: tuple[Any, ...]) -> Any:
    """The one row of a function's call."""
    return await _on_driver(db, lambda driver: driver.fetchrow(sql, *params))


async def _on_driver(db: Database, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """One statement on an asyncpg connection this process holds for ``db``
    (:mod:`~trustplane.reference.driver_connections`: no ``BEGIN``/``COMMIT``, no statement
    compilation, no pool checkout); once more on a fresh connection if that one was dead. When all
    the held connections are lent, on the autocommit pool's (:func:`_on_pool`)."""
    held = connections_of(db)
    for attempt in (1, 2):
        conn = await held.take(fresh=attempt == 2)
        if conn is None:
            return await _on_pool(db, call)
        try:
            result = await call(conn)
        except asyncpg.exceptions.UniqueViolationError:
            held.give(conn)
            raise Duplicate() from None
        except _DISCONNECTS:
            held.drop(conn)
            if attempt == 2:
                raise
            continue
        except asyncpg.PostgresError:  # refused by the server: the connection itself is fine
            held.give(conn)
            raise
        except BaseException:  # cancelled mid-statement, or a client-side failure
            held.drop(conn)
            raise
        held.give(conn)
        return result
    raise AssertionError("unreachable")


async def _on_pool(db: Database, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """One statement on the autocommit engine's asyncpg connection, once more on a fresh
    connection if the pooled one was dead.

    The connection is the pool's own (``raw_connection``: the same pool, checkout events and
    connections), without the ``AsyncConnection`` and ``Connection`` SQLAlchemy builds around a
    checkout: 35 against 76-97 us of CPU per ``SELECT 1`` in process (2026-12-04, uvloop)."""
    engine = db.autocommit_engine
    for attempt in (1, 2):
        raw = await engine.raw_connection()
        try:
            return await call(raw.driver_connection)
        except asyncpg.exceptions.UniqueViolationError:
            raise Duplicate() from None
        except _DISCONNECTS:
            await greenlet_spawn(raw.invalidate)  # closing an asyncpg connection awaits
            if attempt == 2:
                raise
        finally:
            raw.close()  # back to the pool (detached from it when invalidated)
    raise AssertionError("unreachable")
