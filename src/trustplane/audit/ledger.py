"""The ledger service: the log key, the sequencer, checkpoints, proofs, queries and the retention purge.

Appends do not come through here (see :mod:`trustplane.audit.sink`): they land in the pending table in
the caller's transaction. :meth:`Ledger.integrate` then, in one transaction and as the only sequencer
(PostgreSQL advisory lock / SQLite write lock), takes the oldest pending rows, gives them the next leaf
indices, inserts the leaves, payloads and every perfect-subtree node that became complete, deletes the
pending rows, and signs a checkpoint for the new size. A crash anywhere rolls all of it back, so the
sequence has no gaps and no duplicates, and an acknowledged entry is either pending or integrated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.exc import DataError, IntegrityError

from trustplane.audit import merkle, store
from trustplane.audit.canonical import EntryError
from trustplane.audit.note import Checkpoint, Signer
from trustplane.audit.proof_nodes import ProofNodes
from trustplane.audit.sink import APPEND_WAKES, APPENDED, pending_row, write_events
from trustplane.audit.store import StoredEntry
from trustplane.audit.tables import LEAF_LIMITS, leaf_value
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.keys.crypto import decrypt_private_key, encrypt_private_key
from trustplane.settings import Settings
from trustplane.storage.db import Database, is_disconnect
from trustplane.storage.driver_sql import in_transaction
from trustplane.storage.turn import WriterTurn

log = structlog.get_logger("trustplane.audit")
#: Seconds between the sequencer's rounds when this process appends nothing: how soon entries that
#: only other processes appended (and did not integrate) are integrated.
IDLE_POLL = 1.0
MAX_ENTRIES = 1000
#: Entries an integration computes (parse, leaf hash, tree nodes) between two turns it gives the
#: event loop: about 0.3 ms of this process's CPU, so that a proof or request of the same process
#: does not wait behind the sequencer for long (a 2,048-entry batch computed at once held the
#: loop 8-20 ms; docs/ledger.md, "Proofs during an integration").
SLICE = 64

INTEGRATED = Counter("trustplane_audit_integrated_total", "Ledger entries integrated into the tree")
# the tree only grows: with several workers the largest size any of them integrated to is current
TREE_SIZE = Gauge(
    "trustplane_audit_tree_size",
    "Ledger tree size after the last integration",
    multiprocess_mode="max",
)
INTEGRATION_SECONDS = Histogram(
    "trustplane_audit_integration_seconds",
    "Duration of one integration transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SEQUENCER_FAILURES = Counter("trustplane_audit_sequencer_failures_total", "Failed integrations")
PENDING_VACUUMS = Counter(
    "trustplane_audit_pending_vacuums_total",
    "VACUUMs of the ledger's pending table by its sequencer (PostgreSQL)",
)
#: PostgreSQL: after this many entries moved out of ``audit_pending`` the sequencer vacuums it.
#: The table is a queue: each entry is inserted once and deleted when integrated, so its dead
#: rows pile up at the rate of the appends (5,000 a second at 2,500 tokens/s), which autovacuum
#: (when it is on at all) reaches at most once a minute by default; read through them, the
#: sequencer's statements slow down with every round, and the heap only grows. Vacuumed every
#: 20,000 rows it stays a few megabytes, and each vacuum is a few milliseconds of the database's CPU.
VACUUM_EVERY = 20_000
QUARANTINED = Counter(
    "trustplane_ledger_quarantined_total",
    "Pending ledger entries the sequencer could not integrate: moved to audit_quarantine, a "
    "placeholder leaf in their place (docs/ledger.md, Quarantine)",
)
PURGED = Counter("trustplane_audit_payloads_purged_total", "Payloads purged by retention", ["type"])


class LedgerError(ValueError):
    """A request the ledger cannot answer as asked (index or size out of range); the message says why."""


@dataclass(frozen=True, slots=True)
class Integration:
    first: int
    count: int
    size: int
    root: bytes
    seconds: float


@dataclass(frozen=True, slots=True)
class _Batch:
    """One integration, computed: the tree grows from ``size`` to ``new_size``."""

    size: int
    new_size: int
    root: bytes
    note: str
    now: int
    leaves: list[tuple[Any, ...]]
    nodes: list[tuple[int, bytes]]
    payloads: list[tuple[int, str, bytes]]
    pending_ids: list[int]
    #: the new nodes per level, for this process's proof cache (``merkle.TreeBuilder.runs``)
    runs: list[tuple[int, int, bytes]]


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: str


@dataclass(frozen=True, slots=True)
class ProvenEntry:
    entry: StoredEntry
    proof: list[bytes] = field(default_factory=list)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def entry_record(item: StoredEntry, proof: Sequence[bytes] | None = None) -> dict[str, Any]:
    """The JSON shape of one entry in API answers (see docs/ledger.md; the JSONL export embeds the
    stored bytes instead: :mod:`trustplane.audit.export_format`)."""
    out: dict[str, Any] = {
        "index": item.index,
        "entry": orjson.loads(item.entry),
        "leaf_hash": b64(item.leaf_hash),
        "payload": orjson.loads(item.payload) if item.payload is not None else None,
        "salt": b64(item.salt) if item.salt is not None else None,
    }
    if proof is not None:
        out["inclusion_proof"] = [b64(h) for h in proof]
    return out


class Ledger:
    def __init__(self, settings: Settings, db: Database, kek: bytes) -> None:
        self._settings, self._db, self._kek = settings, db, kek
        self.origin = settings.audit_origin
        self._signer: Signer | None = None
        self._lock = asyncio.Lock()
        #: A tree size known to exist (sizes only grow): proofs up to it skip reading the state.
        self._known_size = 0
        self._nodes = ProofNodes(db, cache_bytes=settings.audit_proof_cache_mb << 20)
        #: ``time.monotonic()`` of the sequencer loop's last successful round (readiness).
        self._last_progress: float | None = None
        #: A round found another process holding the sequencer lock (PostgreSQL).
        self._contended = False
        self._moved_since_vacuum = 0  # PostgreSQL: entries moved out of audit_pending since
        #: SQLite file: the workers' turn (storage.turn), taken around the write transaction so that
        #: the group-commit writers queue behind it in the kernel, not in SQLite's polling busy handler
        self._writer_turn = WriterTurn.for_database(db)
        #: PostgreSQL: (size, nodes) of the right edge of the tree this process's last batch
        #: committed (nodes never change: the next batch from that size needs no read of them);
        #: ``_next_frontier`` is the one of the batch in flight, kept once it has committed.
        self._frontier: tuple[int, dict[int, bytes]] | None = None
        self._next_frontier: tuple[int, dict[int, bytes]] | None = None
        #: :meth:`integrate_all`'s last batch was full: the next :meth:`integrate` reads at once
        self._backlog = False

    # ------------------------------------------------------------------ the log key

    @property
    def _aad(self) -> str:
        return f"audit-log:{self.origin}"

    async def signer(self) -> Signer:
        """The log's Ed25519 key, created (and its creation audited) on first use."""
        if self._signer is None:
            async with self._db.read() as conn:
                stored = await store.read_log_key(conn, self.origin)
            if stored is None:
                stored = await self._create_key()
            key = decrypt_private_key(stored[1], self._kek, self._aad)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise LedgerError("the stored log key is not an Ed25519 key")
            self._signer = Signer(self.origin, key)
        return self._signer

    async def _create_key(self) -> tuple[bytes, bytes]:
        key = ed25519.Ed25519PrivateKey.generate()
        signer = Signer(self.origin, key)
        blob = encrypt_private_key(key, self._kek, self._aad)
        event = AuditEvent(
            type=AuditEventType.AUDIT_LOG_KEY_CREATED,
            issuer=self._settings.issuer,
            service="trustplane.audit",
            payload={"verifier_key": signer.verifier_key},
        )
        try:
            async with self._db.transaction() as conn:
                await store.add_log_key(conn, self.origin, signer.public_key, blob, _now())
                await write_events(conn, [event])
        except Exception:  # another process created it first: use theirs
            async with self._db.read() as conn:
                stored = await store.read_log_key(conn, self.origin)
            if stored is None:
                raise
            return stored
        log.info("audit_log_key_created", origin=self.origin, verifier_key=signer.verifier_key)
        return signer.public_key, blob

    def loaded_verifier_key(self) -> str | None:
        return self._signer.verifier_key if self._signer else None

    async def verifier_key(self) -> str:
        return (await self.signer()).verifier_key

    # ------------------------------------------------------------------ the sequencer

    async def start(self) -> None:
        """The log key, what is pending integrated, the upper tree nodes read; the lower levels
        kept for proofs are read in the background (about 1 s per million entries on a loaded
        2-vCPU machine): the proofs meanwhile read them from the database."""
        await self.signer()
        await self.integrate_all()
        await self._nodes.load_upper()
        size = await self._nodes.tree_size()
        self._known_size = max(self._known_size, size)
        if size:
            self._nodes.fill_later(size)

    async def warm(self) -> int:
        """Read the upper tree nodes that every proof shares into memory (one statement), then
        the lower levels as far as ``audit_proof_cache_mb`` allows, once a fill in the background
        has ended (see
        :mod:`~trustplane.audit.proof_nodes`); returns how many upper nodes are kept."""
        upper = await self._nodes.load_upper()
        size = await self._nodes.tree_size()
        self._known_size = max(self._known_size, size)
        if size:
            await self._nodes.fill(size)
        return upper

    async def integrate(self, max_batch: int | None = None) -> Integration | None:
        """Integrate up to ``max_batch`` pending entries; None if there were none or another process
        is the sequencer right now. Called by :meth:`integrate_all` right after a full batch
        (``_backlog``), it skips the "anything pending?" read (the batch read finds out, and
        nothing is written, if there is nothing).

        On SQLite the sequencer's lock is the database write lock, which every request's group
        commit needs too, so the round holds it only to write (docs/operations.md, "The sequencer
        and the write lock"): whether anything is pending is read first (an empty round takes no
        lock), then the batch is read and its leaves, tree nodes and signed checkpoint computed under
        a read snapshot, and only then the write transaction runs, its first statement moving the
        state from the size that was read (if another process integrated meanwhile, nothing is
        written and the batch is prepared afresh). PostgreSQL holds its advisory lock for the whole
        round (it blocks no other writer)."""
        pending, self._backlog = self._backlog, False  # before any await: this call's alone
        signer = await self.signer()
        limit = max_batch or self._settings.audit_integrate_batch
        async with self._lock:  # one round at a time in this process
            while True:
                if not self._db.is_sqlite:  # the round's transaction reads the batch
                    if not pending and not await self._any_pending():
                        return None
                    batch = None
                else:
                    async with self._db.read() as conn:
                        if not pending and not await store.has_pending(conn):
                            return None
                        state = await store.read_state(conn)
                        batch = (
                            None
                            if state is None
                            else await self._prepare(conn, signer, state, limit)
                        )
                    if batch is None and state is not None:
                        return None  # nothing pending: no write lock taken
                started = time.perf_counter()
                async with self._turn(), self._db.transaction() as conn:
                    if batch is not None:  # SQLite: prepared under the snapshot above
                        if not await store.advance_state(
                            conn, batch.size, batch.new_size, batch.root, batch.now
                        ):
                            continue  # another process integrated since: this batch is stale
                    elif not self._db.is_sqlite:  # PostgreSQL: all of it in this transaction
                        batch = await self._pg_batch(conn, signer, limit)
                        if batch is None:
                            return None
                        break
                    else:
                        batch = await self._locked_batch(conn, signer, limit)
                        if batch is None:
                            return None
                    await store.insert_integrated(conn, batch.leaves, batch.nodes, batch.payloads)
                    if await store.drop_pending(conn, batch.pending_ids) != len(batch.pending_ids):
                        raise RuntimeError("pending entries changed under the sequencer lock")
                    await store.add_checkpoint(
                        conn, batch.new_size, batch.root, batch.note, batch.now
                    )
                break
        seconds = time.perf_counter() - started
        # committed: they serve this process's proofs (one step per level of the tree)
        await self._nodes.remember_committed(batch.runs, batch.new_size)
        self._frontier, self._next_frontier = self._next_frontier, None
        count = len(batch.pending_ids)
        self._known_size = max(self._known_size, batch.new_size)
        INTEGRATED.inc(count)
        TREE_SIZE.set(batch.new_size)
        INTEGRATION_SECONDS.observe(seconds)
        await _release(batch.leaves, batch.payloads, batch.nodes)
        if not self._db.is_sqlite:  # SQLite reuses a deleted row's page on its own
            self._moved_since_vacuum += count
            if self._moved_since_vacuum >= VACUUM_EVERY:
                await self._vacuum_pending()
        return Integration(batch.size, count, batch.new_size, batch.root, seconds)

    async def _vacuum_pending(self) -> None:
        """PostgreSQL: ``VACUUM audit_pending`` (:data:`VACUUM_EVERY`). A failure is logged and
        tried again after the next batch: the ledger is correct without it, only slower."""
        started = time.perf_counter()
        try:
            async with self._db.autocommit_engine.connect() as conn:
                await store.pg_vacuum_pending(conn)
        except Exception as exc:  # housekeeping: the next batch tries again
            log.warning("audit_pending_vacuum_failed", error=str(exc))
            return
        moved, self._moved_since_vacuum = self._moved_since_vacuum, 0
        PENDING_VACUUMS.inc()
        log.debug(
            "audit_pending_vacuumed",
            entries=moved,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def _any_pending(self) -> bool:
        """PostgreSQL: whether anything is pending, in one statement on the autocommit engine (one
        round trip; a pooled connection would add ``BEGIN`` and ``ROLLBACK``), once more on a
        fresh connection if the pooled one turns out to be dead (checkouts are not pre-pinged)."""
        for attempt in (1, 2):
            async with self._db.autocommit_engine.connect() as conn:
                try:
                    return await store.pg_has_pending(conn)
                except Exception as exc:
                    if attempt == 2 or not is_disconnect(exc):
                        raise
        raise AssertionError("unreachable")

    def _turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        return (
            self._writer_turn.hold() if self._writer_turn is not None else contextlib.nullcontext()
        )

    async def _locked_batch(self, conn: Any, signer: Signer, limit: int) -> _Batch | None:
        """The round in one transaction: become the sequencer, read and compute, move the state
        (PostgreSQL, and a new log's first round on SQLite). None: another process is the
        sequencer, or nothing is pending."""
        if not await store.lock_sequencer(conn):
            self._contended = True
            return None
        state = await store.read_state(conn)
        if state is None:  # a new log: the empty tree gets its checkpoint too
            state = await self._start_log(conn, signer)
        batch = await self._prepare(conn, signer, state, limit)
        if batch is not None:
            await store.write_state(conn, batch.new_size, batch.root, batch.now, new=False)
        return batch

    async def _start_log(self, conn: Any, signer: Signer) -> tuple[int, bytes]:
        """A new log's state: the empty tree, with its signed checkpoint (in ``conn``'s open
        transaction)."""
        now = _now()
        await store.write_state(conn, 0, merkle.EMPTY_ROOT, now, new=True)
        note = signer.sign(Checkpoint(self.origin, 0, merkle.EMPTY_ROOT).body())
        await store.add_checkpoint(conn, 0, merkle.EMPTY_ROOT, note, now)
        return (0, merkle.EMPTY_ROOT)

    async def _pg_batch(self, conn: Any, signer: Signer, limit: int) -> _Batch | None:
        """PostgreSQL: the round in the open transaction ``conn``, on its asyncpg connection
        (no SQLAlchemy layers after the lock): become the sequencer, read the state, the oldest
        ``limit`` pending (id, entry) rows and the tree's frontier; hash the entries
        :data:`SLICE` at a time (the loop's turn between slices) and every
        :data:`~trustplane.audit.store.INSERT_SLICE` entries move those pending rows into the
        leaves and payloads and insert the slice's nodes, in one statement
        (:func:`~trustplane.audit.store.pg_move_slice`: the entries, payloads and salts are not
        sent back to the server); finally the new state and the signed checkpoint, in one
        statement. None: another process is the sequencer, or nothing is pending (nothing
        written)."""
        self._next_frontier = None
        if not await store.lock_sequencer(conn):  # through SQLAlchemy: it begins the transaction
            self._contended = True
            return None
        driver = await in_transaction(conn)
        if driver is None:
            raise RuntimeError("the sequencer's transaction is not open")
        state, rows = await store.pg_state_and_pending(driver, limit)
        if state is None:  # a new log: the empty tree gets its checkpoint too
            state = await self._start_log(conn, signer)
            rows = list(await store.pg_take_pending(driver, limit))
        size, now = state[0], _now()
        if not rows:
            return None
        known = self._frontier
        frontier = (
            known[1]  # this process's last batch ended at this size: its right edge, unchanged
            if known is not None and known[0] == size
            else await store.pg_read_nodes(driver, merkle.frontier_ids(size))
        )
        builder = merkle.TreeBuilder(size, frontier, runs=True)
        nodes: list[tuple[int, bytes]] = []
        ids: list[int] = []
        moved, step, nul_escape, nul = 0, store.INSERT_SLICE, store.NUL_ESCAPE, False
        chunk = math.gcd(SLICE, step)  # a turn every SLICE entries, a statement every step
        for first in range(0, len(rows), chunk):
            if first and not first % step:  # the last step's rows and nodes, one statement
                moved += await store.pg_move_slice(
                    driver, ids[first - step :], size + first - step, now, nodes, nul=nul
                )
                nodes, nul = [], False
            if first and not first % SLICE:
                await asyncio.sleep(0)  # the loop's turn: the proofs and requests waiting run
            part = rows[first : first + chunk]
            entries: list[str] = [row[1] for row in part]
            ids += [row[0] for row in part]
            # memchr for a backslash first (rare): the slice the server must parse with care
            nul = nul or any(nul_escape in e for e in entries if "\\" in e)
            nodes += builder.extend(merkle.leaf_hashes(entries))
        last = (len(ids) - 1) // step * step
        moved += await store.pg_move_slice(driver, ids[last:], size + last, now, nodes, nul=nul)
        if moved != len(ids):
            raise RuntimeError("pending entries changed under the sequencer lock")
        root, new_size = builder.root(), builder.size
        note = signer.sign(Checkpoint(self.origin, new_size, root).body())
        await store.pg_advance(driver, new_size, root, note, now)
        self._next_frontier = (new_size, builder.frontier())  # the next batch's, once committed
        return _Batch(size, new_size, root, note, now, [], [], [], ids, builder.runs())

    async def _prepare(
        self, conn: Any, signer: Signer, state: tuple[int, bytes], limit: int
    ) -> _Batch | None:
        """The next ``limit`` pending entries as leaves appended to the tree of ``state``: rows,
        tree nodes and the signed checkpoint of the new size (reads only; None: nothing pending)."""
        size, now = state[0], _now()
        rows = await store.take_pending(conn, limit)
        if not rows:
            return None
        frontier = await store.read_nodes(conn, merkle.frontier_ids(size))
        builder = merkle.TreeBuilder(size, frontier, runs=True)
        leaves, nodes, payloads = [], [], []
        ids = []
        for offset, row in enumerate(rows):
            if offset and not offset % SLICE:
                await asyncio.sleep(0)  # the loop's turn: the proofs and requests waiting run
            ids.append(int(row[0]))
            entry, payload, salt = row[1], row[2], bytes(row[3])
            index = size + offset
            e = orjson.loads(entry)
            if not isinstance(e, dict):
                raise EntryError(f"pending entry {row[0]} is not a JSON object")
            fit = {c: leaf_value(e.get(c), n) for c, n in LEAF_LIMITS.items()}
            if fit["event_id"] is None or fit["type"] is None or type(e["time"]) is not int:
                raise EntryError(f"pending entry {row[0]} has no event_id, type or time")
            leaves.append(
                (
                    index,
                    entry,
                    fit["event_id"],
                    fit["type"],
                    e["time"],
                    fit["subject"],
                    fit["client_id"],
                    fit["partner"],
                    fit["transaction_id"],
                    now,
                )
            )
            nodes.extend(builder.append(merkle.leaf_hash(entry.encode())))
            payloads.append((index, payload, salt))
        root, new_size = builder.root(), builder.size
        note = signer.sign(Checkpoint(self.origin, new_size, root).body())
        return _Batch(size, new_size, root, note, now, leaves, nodes, payloads, ids, builder.runs())

    async def integrate_all(self) -> int:
        """Integrate what is pending now: until an integration takes less than a full batch (it took
        everything there was), nothing is pending, or another process holds the sequencer lock.

        Entries appended while it runs wait for the next round. Under sustained load something is
        always pending again by the time an integration commits; chasing it would run small
        integrations back to back, each taking (on SQLite) the write lock the requests' group
        commit needs, so the loop (:meth:`run`) comes back every ``audit_integrate_interval``
        instead and each integration takes a larger batch."""
        total = 0
        while True:
            try:
                return total + await self._integrate_all()
            except Exception as exc:
                if not quarantinable(exc):
                    raise
                log.error("audit_integration_failed", error=repr(exc))
                moved = await self._isolate(exc)
                if moved is None:
                    raise
                total += moved

    async def _integrate_all(self) -> int:
        total, limit = 0, self._settings.audit_integrate_batch
        while (done := await self.integrate()) is not None:
            total += done.count
            # a full batch: more is pending, the next one is read without asking first (the flag
            # is set and read with no await between: no other caller's integrate() sees it)
            self._backlog = done.count >= limit
            if self._last_progress is not None:  # a backlog larger than one batch:
                self._last_progress = time.monotonic()  # each integration is progress (readiness)
            if done.count < limit:
                break
        self._backlog = False
        return total

    async def _isolate(self, failure: Exception) -> int | None:
        """After an integration failed with ``failure`` (:func:`quarantinable`): find the pending
        entry it failed on and quarantine it. Smaller and smaller batches from the oldest entry are
        integrated (each a normal integration: the entries before the culprit are integrated, in
        order) until one of a single entry fails, twice: that entry is the culprit and is replaced
        by its placeholder (:meth:`_quarantine`; the placeholder is counted when integrated).
        Returns the entries integrated meanwhile (the caller integrates on), or None if nothing
        was pending any more or another process is the sequencer (the caller raises ``failure``:
        the entries stay pending)."""
        size = max(1, self._settings.audit_integrate_batch // 2)
        done, failed = 0, 0
        while done < self._settings.audit_integrate_batch:
            try:
                step = await self.integrate(size)
            except Exception as exc:
                if not quarantinable(exc):
                    raise
                failed, failure = (failed + 1 if size == 1 else 0), exc
                if failed >= 2:  # the oldest entry, alone, failed twice in a row
                    await self._quarantine(failure)  # its placeholder counts once integrated
                    return done
                size = max(1, size // 2)
                continue
            if step is None:
                return done or None  # nothing pending, or another process is the sequencer
            done, failed = done + step.count, 0  # another entry is the oldest now
        return done  # a run of good batches: the next round goes on

    async def _quarantine(self, failure: Exception) -> bool:
        """Move the oldest pending row to ``audit_quarantine`` and put its placeholder in its place
        in the pending table (the same id, so the same position in the log): an
        ``audit:entry:quarantined`` entry whose ``reason`` is the error's class and whose
        ``reason_ids`` hold the raw row's pending id and the SHA-256 of its entry and payload. One
        transaction, as the sequencer. False: another process is the sequencer, or nothing is
        pending. A placeholder is never quarantined (``failure`` is raised): the
        sequencer itself is failing, not an entry."""
        error = error_name(failure)
        async with self._turn(), self._db.transaction() as conn:
            if not await store.lock_sequencer(conn):
                return False
            row = await store.oldest_pending(conn)
            if row is None:
                return False
            pending_id, entry, payload, salt = int(row[0]), row[1], row[2], bytes(row[3])
            if _is_placeholder(entry):
                raise failure
            placeholder = self._placeholder(pending_id, entry, payload, error)
            await store.quarantine_pending(
                conn,
                (pending_id, entry, payload, salt, error[:128], repr(failure)),
                placeholder.event_id,
                pending_row(placeholder),
                _now_ms(),
            )
        QUARANTINED.inc()
        log.error(
            "audit_entry_quarantined",
            pending_id=pending_id,
            error=error,
            detail=repr(failure)[:500],
            placeholder=placeholder.event_id,
            entry_sha256=_sha256(entry),
        )
        return True

    def _placeholder(self, pending_id: int, entry: str, payload: str, error: str) -> AuditEvent:
        return AuditEvent(
            type=AuditEventType.AUDIT_ENTRY_QUARANTINED,
            issuer=self._settings.issuer,
            service="trustplane.audit",
            decision="quarantined",
            reason=error[:128],
            reason_ids=(
                f"pending_id={pending_id}",
                f"entry_sha256={_sha256(entry)}",
                f"payload_sha256={_sha256(payload)}",
            ),
            payload={"pending_id": pending_id, "error": error},
        )

    async def quarantined(self) -> int:
        """How many pending entries were ever quarantined (rows of ``audit_quarantine``)."""
        async with self._db.read() as conn:
            return await store.count_quarantined(conn)

    async def run(self, stopping: asyncio.Event | None = None, idle: float | None = None) -> None:
        """The background sequencer, woken by this process's appends (``sink.APPEND_WAKES``): a round
        runs ``audit_integrate_interval`` seconds after the last one (at once if that long has
        passed), or sooner when this process has appended half a batch since. With no local append
        it sleeps: only a poll every ``idle`` seconds (:data:`IDLE_POLL`; at least the interval) finds entries appended
        by other processes that no sequencer integrated (the CLI's; on PostgreSQL a sequencer that
        found another holding the lock retries after one interval).

        An append wakes the loop from inside its transaction, so the round may read before that
        commits: every round that had local appends (or lost the lock) is followed by one more an
        interval later. Returns once ``stopping`` is set, between rounds: a round is never abandoned
        inside its transaction (on SQLite a connection dropped mid-write can keep the write lock
        until it is collected)."""
        interval = self._settings.audit_integrate_interval
        idle = max(IDLE_POLL if idle is None else idle, interval)
        threshold = max(1, self._settings.audit_integrate_batch // 2)
        stopping = stopping if stopping is not None else asyncio.Event()
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        seen, last, again = APPENDED[0], time.monotonic(), False
        idle_wait = False  # the loop sleeps for the idle poll: no append seen since its round

        def wake_up() -> None:
            """An append (on the loop, or in the group-commit writer's SQLite thread: hence
            ``call_soon_threadsafe``, which sets the event on the loop after it cleared it). Only
            a loop sleeping for the idle poll, or appends reaching half a batch, need waking: a
            loop already due an interval after its last round would only pass through its wait
            again (two tasks made, waited on and cancelled) at every group commit."""
            if idle_wait or APPENDED[0] - seen >= threshold:
                loop.call_soon_threadsafe(wake.set)

        APPEND_WAKES.add(wake_up)
        self._last_progress, early = last, last  # start() integrated: an append may go at once
        try:
            while not stopping.is_set():
                # set before APPENDED is read: an append from another thread after the read wakes
                idle_wait = True
                now = time.monotonic()
                if APPENDED[0] - seen >= threshold:
                    due = now
                elif APPENDED[0] != seen or again:
                    due, idle_wait = early, False
                else:
                    due = last + idle
                if due > now:  # no await since APPENDED was read: no append is missed
                    wake.clear()
                    await _wait(wake, stopping, due - now)
                    continue
                idle_wait, fresh = False, APPENDED[0] != seen
                seen, last, early, self._contended = APPENDED[0], now, now + interval, False
                # this process appended since its last round: the round reads its batch at once,
                # without asking first whether anything is pending (under load every round, one
                # statement fewer; if another process took it all, the batch read finds nothing)
                self._backlog = self._backlog or fresh
                try:
                    await self.integrate_all()
                except Exception as exc:  # keep sequencing; the entries stay pending and durable
                    SEQUENCER_FAILURES.inc()
                    log.error("audit_integration_failed", error=repr(exc))
                else:
                    self._last_progress = time.monotonic()
                # appends whose transaction had not committed when this round read, or entries the
                # sequencer holding the lock may have taken before they committed: one more round
                again = fresh or self._contended
        finally:
            APPEND_WAKES.discard(wake_up)

    def progress_age(self) -> float | None:
        """Seconds since the sequencer loop last completed a round without error (a round where
        another process held the sequencer lock counts: that process is sequencing); None if the
        loop has not started in this process."""
        if self._last_progress is None:
            return None
        return time.monotonic() - self._last_progress

    # ------------------------------------------------------------------ reading

    async def checkpoint(self, size: int | None = None) -> SignedCheckpoint | None:
        async with self._db.read() as conn:
            row = await (
                store.latest_checkpoint(conn) if size is None else store.checkpoint_at(conn, size)
            )
        return SignedCheckpoint(*row) if row else None

    async def _has_size(self, size: int) -> bool:
        """Whether the tree has reached ``size`` (sizes only grow: read only past the known one)."""
        if size > self._known_size:
            self._known_size = max(self._known_size, await self._nodes.tree_size())
        return size <= self._known_size

    async def inclusion(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 §2.1.3.1 inclusion proof of leaf ``index`` in the tree of ``size``: the nodes
        not in memory read in one statement (:class:`~trustplane.audit.proof_nodes.ProofNodes`)."""
        if not 0 <= index < size or not await self._has_size(size):
            raise LedgerError(f"no leaf {index} in a tree of size {size} (or size too large)")
        try:
            return await self._nodes.proof(merkle.inclusion_nodes(index, size), size)
        except KeyError:
            raise _nodes_missing() from None

    async def consistency(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 §2.1.4.1 consistency proof between the trees of sizes ``first`` <= ``second``."""
        if not 0 < first <= second or not await self._has_size(second):
            raise LedgerError(f"no consistency proof from {first} to {second}")
        return await self._hashes(merkle.consistency_ranges(first, second), second)

    async def _hashes(self, ranges: list[merkle.Range], size: int) -> list[bytes]:
        try:
            return await self._nodes.range_hashes(ranges, size)
        except KeyError:
            raise _nodes_missing() from None

    async def entries(self, start: int, end: int) -> list[StoredEntry]:
        if not 0 <= start < end or end - start > MAX_ENTRIES:
            raise LedgerError(f"entries need 0 <= start < end and at most {MAX_ENTRIES} at once")
        async with self._db.read() as conn:
            return await store.entries_range(conn, start, end)

    async def iter_entries(
        self, start: int, end: int, chunk: int = 5000
    ) -> AsyncIterator[StoredEntry]:
        for first in range(start, end, chunk):
            async with self._db.read() as conn:
                for item in await store.entries_range(conn, first, min(end, first + chunk)):
                    yield item

    async def search(
        self, filters: dict[str, Any], after: int = 0, limit: int = 100, size: int | None = None
    ) -> tuple[SignedCheckpoint, list[ProvenEntry]]:
        """Entries matching ``filters`` with index >= ``after``, each with its inclusion proof
        against the latest checkpoint (entries not yet integrated are not returned)."""
        async with self._db.read() as conn:
            row = await (
                store.latest_checkpoint(conn) if size is None else store.checkpoint_at(conn, size)
            )
            if row is None:
                raise LedgerError("the log has no checkpoint yet")
            checkpoint = SignedCheckpoint(*row)
            found = await store.entries_where(conn, filters, after, checkpoint.size, limit)
        # the nodes in one statement, as concurrent proofs read theirs (and sharing with them)
        plans = [merkle.inclusion_nodes(e.index, checkpoint.size) for e in found]
        try:
            proofs = await self._nodes.proofs(plans, checkpoint.size) if found else []
        except KeyError:
            raise _nodes_missing() from None
        return checkpoint, [ProvenEntry(e, p) for e, p in zip(found, proofs, strict=True)]

    # ------------------------------------------------------------------ retention

    def retention(self) -> dict[str, int]:
        return dict(self._settings.audit_retention_days)

    async def due(self, now_ms: int | None = None) -> dict[str, int]:
        """Payloads past their retention period, by configured type."""
        now_ms = now_ms or _now_ms()
        async with self._db.read() as conn:
            return await store.due_payloads(conn, await self._cutoffs(conn, now_ms))

    async def _cutoffs(self, conn: Any, now_ms: int) -> dict[str, int]:
        """Type -> the time before which its payloads are due (``"*"``: every type the log holds
        without a period of its own)."""
        periods = self.retention()
        default = periods.pop("*", None)
        if default is not None:
            periods |= {t: default for t in await store.leaf_types(conn) if t not in periods}
        return {t: now_ms - days * 86_400_000 for t, days in periods.items()}

    async def purge(self, now_ms: int | None = None) -> dict[str, int]:
        """Delete the payloads past retention (their leaves stay, so every proof still verifies) and
        record the purge itself as an audit event, in the same transaction."""
        now_ms = now_ms or _now_ms()
        async with self._db.transaction() as conn:
            purged = await store.purge_payloads(conn, await self._cutoffs(conn, now_ms))
            if purged:
                await write_events(conn, [self._purge_event(purged)])
        for type_, count in purged.items():
            PURGED.labels(type=type_).inc(count)
        if purged:
            log.info("audit_payloads_purged", counts=purged)
        return purged

    def _purge_event(self, purged: dict[str, int]) -> AuditEvent:
        return AuditEvent(
            type=AuditEventType.AUDIT_PAYLOADS_PURGED,
            issuer=self._settings.issuer,
            service="trustplane.audit",
            decision="allow",
            reason="retention",
            reason_ids=tuple(f"{t}={n}" for t, n in sorted(purged.items())),
            payload={"purged": purged, "retention_days": self.retention()},
        )


def quarantinable(exc: BaseException) -> bool:
    """Whether an integration's failure may be an entry's fault, one the sequencer would meet
    again on every round (an over-long or malformed value: SQLSTATE class 22 "data exception" or 23
    "integrity constraint violation", or the entry's parse in Python): then
    :meth:`Ledger._isolate` looks for the entry. A lost connection, a timeout, a lock, a missing
    table or a bug in the SQL (the other classes) is no entry's fault: the entries stay pending."""
    if is_disconnect(exc) or isinstance(exc, LedgerError | RuntimeError):
        return False
    state = _sqlstate(exc)
    if state is not None:
        return state[:2] in ("22", "23")
    if isinstance(exc, IntegrityError | DataError):  # SQLite: no SQLSTATE
        return True
    return isinstance(exc, ValueError | KeyError | TypeError)


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (asyncpg's, or the one SQLAlchemy wraps), if any."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str):
            return state
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def error_name(exc: BaseException) -> str:
    """The class of ``exc`` (of the driver's error SQLAlchemy wraps) and its SQLSTATE, if any."""
    inner = getattr(exc, "orig", None) or exc
    inner = (
        inner.__cause__
        if type(inner).__name__.startswith("AsyncAdapt") and inner.__cause__
        else inner
    )
    state = _sqlstate(exc)
    return type(inner).__name__ + (f" ({state})" if state else "")


def _sha256(text_: str) -> str:
    return hashlib.sha256(text_.encode("utf-8", "surrogatepass")).hexdigest()


def _is_placeholder(entry: str) -> bool:
    try:
        body = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("type") == AuditEventType.AUDIT_ENTRY_QUARANTINED


async def _release(*parts: list[Any]) -> None:
    """Empty the lists of a committed batch a slice at a time, the loop's turn between slices:
    freeing a 2,048-entry batch's 10,000 objects at once held the event loop 1.5-2 ms."""
    for part in parts:
        while part:
            del part[-4 * SLICE :]
            await asyncio.sleep(0)


def _nodes_missing() -> LedgerError:
    log.error("audit_tree_nodes_missing")
    return LedgerError("tree nodes needed for this proof are missing from the database")


async def _wait(wake: asyncio.Event, stopping: asyncio.Event, seconds: float) -> None:
    """Until ``wake`` or ``stopping`` is set, or ``seconds`` have passed."""
    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


def _now() -> int:
    return int(time.time())


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
