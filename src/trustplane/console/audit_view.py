"""The Audit explorer: entries from the ledger, each with its RFC 9162 inclusion proof checked here
against the latest signed checkpoint, and a transaction's chain of authority
(person -> mandate -> tokens -> exchanges -> decisions -> trade transitions -> events). The
transitions are the settlement services' signed events the ledger ingested (``trade:*`` entries,
``POST /audit/events``), each naming in its payload the decisions it rests on.

What "verified" means on these pages: the checkpoint's signature checks with this log's key
(C2SP signed-note), and the entry's bytes, hashed as a leaf, lead through the proof to the
checkpoint's root. It is checked by the server an auditor is questioning; the export (JSONL with the
proofs, and the checkpoint) is what they check offline with the key they hold
(``trustplane audit verify``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from trustplane.audit import merkle
from trustplane.audit.export_format import export_line
from trustplane.audit.ledger import Ledger, LedgerError, ProvenEntry, SignedCheckpoint
from trustplane.audit.note import NoteError, Verifier, open_checkpoint
from trustplane.mandates.errors import MandateError
from trustplane.mandates.service import MandateService

FILTERS = ("type", "subject", "client_id", "partner", "transaction_id")
PAGE = 50
EXPORT_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Row:
    index: int
    type: str
    time_ms: int
    subject: str | None
    client_id: str | None
    transaction_id: str | None
    mandate: str | None
    decision: str | None
    reason: str | None
    actor_chain: tuple[str, ...]
    jti: str | None
    verified: bool


@dataclass
class Found:
    checkpoint_size: int
    checkpoint_ok: bool
    checkpoint_problem: str | None
    rows: list[Row]
    next_after: int | None


@dataclass
class Node:
    label: str
    detail: str
    rows: list[Row] = field(default_factory=list)


@dataclass
class Chain:
    transaction_id: str
    found: Found
    stages: list[tuple[str, list[Node]]]


def _row(proven: ProvenEntry, checkpoint: SignedCheckpoint | None) -> Row:
    item = proven.entry
    entry = orjson.loads(item.entry)
    verified = checkpoint is not None and merkle.verify_inclusion(
        item.index,
        checkpoint.size,
        merkle.leaf_hash(item.entry.encode()),
        proven.proof,
        checkpoint.root,
    )
    mandate = entry.get("mandate_id")
    if mandate and entry.get("mandate_version") is not None:
        mandate = f"{mandate} v{entry['mandate_version']}"
    return Row(
        item.index,
        str(entry.get("type")),
        int(entry.get("time") or 0),
        entry.get("subject"),
        entry.get("client_id"),
        entry.get("transaction_id"),
        mandate,
        entry.get("decision"),
        entry.get("reason"),
        tuple(entry.get("actor_chain") or ()),
        entry.get("jti"),
        verified,
    )


class AuditView:
    def __init__(self, ledger: Ledger, mandates: MandateService) -> None:
        self._ledger, self._mandates = ledger, mandates

    async def _checked(
        self, checkpoint: SignedCheckpoint
    ) -> tuple[SignedCheckpoint | None, str | None]:
        """The checkpoint if its signature checks with the log key and its size and root are the
        ones the ledger served, else None and why."""
        try:
            verifier = Verifier.parse(await self._ledger.verifier_key())
            opened = open_checkpoint(checkpoint.note, verifier)
        except (NoteError, LedgerError) as exc:
            return None, str(exc)
        if opened.size != checkpoint.size or opened.root != checkpoint.root:
            return None, "the signed checkpoint is not the one the ledger served"
        return checkpoint, None

    async def search(self, filters: dict[str, Any], after: int = 0, limit: int = PAGE) -> Found:
        try:
            checkpoint, found = await self._ledger.search(filters, after, limit)
        except LedgerError:
            return Found(0, False, "the log has no signed checkpoint yet", [], None)
        checked, problem = await self._checked(checkpoint)
        rows = [_row(p, checked) for p in found]
        more = rows[-1].index + 1 if len(rows) == limit else None
        return Found(checkpoint.size, checked is not None, problem, rows, more)

    async def export(
        self, filters: dict[str, Any], size: int | None = None
    ) -> tuple[str, Iterator[bytes]]:
        """The matching entries as JSONL export lines with their inclusion proofs (the format of
        ``trustplane audit export``) against the checkpoint of ``size`` (default: the latest), and
        that checkpoint's note. The page links the export and the checkpoint with the same size, so
        the two downloads always belong together."""
        checkpoint, found = await self._ledger.search(filters, 0, EXPORT_MAX, size)
        return checkpoint.note, (export_line(p.entry, p.proof) for p in found)

    async def checkpoint_note(self, size: int | None = None) -> str | None:
        latest = await self._ledger.checkpoint(size)
        return latest.note if latest else None

    async def chain(self, transaction_id: str) -> Chain:
        found = await self.search({"transaction_id": transaction_id}, 0, 1000)
        people: dict[str, Node] = {}
        mandates: dict[str, Node] = {}
        tokens: list[Node] = []
        exchanges: list[Node] = []
        decisions: list[Node] = []
        transitions: list[Node] = []
        events: list[Node] = []
        for row in found.rows:
            if row.mandate:
                node = mandates.setdefault(row.mandate, Node(row.mandate, "mandate"))
                node.rows.append(row)
                await self._person_of(row.mandate, people)
            if row.type == "oauth:token:issued":
                target = exchanges if row.actor_chain else tokens
                actors = " acting for ".join(row.actor_chain)
                detail = f"for {row.client_id}" + (f", actor {actors}" if actors else "")
                target.append(Node(row.jti or f"entry {row.index}", detail, [row]))
            elif row.type.startswith("policy:decision:"):
                decisions.append(Node(row.decision or "", row.reason or row.type, [row]))
            elif row.type.startswith("trade:"):
                by = f"by {row.subject}" if row.subject else ""
                detail = ", ".join(x for x in (row.reason, by) if x)
                transitions.append(Node(row.type.removeprefix("trade:"), detail, [row]))
            else:
                events.append(Node(row.type, row.reason or row.decision or "", [row]))
            if row.type.startswith(("oauth:consent", "users:")) and row.subject:
                people.setdefault(row.subject, Node(row.subject, "person")).rows.append(row)
        stages = [
            ("Person", list(people.values())),
            ("Mandate", list(mandates.values())),
            ("Tokens", tokens),
            ("Exchanges", exchanges),
            ("Decisions", decisions),
            ("Transitions", transitions),
            ("Events", events),
        ]
        return Chain(transaction_id, found, stages)

    async def _person_of(self, mandate: str, people: dict[str, Node]) -> None:
        mandate_id = mandate.split(" ", 1)[0]
        try:
            found = await self._mandates.get(mandate_id)
        except MandateError:
            return
        who = found.grantor_person or found.grantor_lei
        people.setdefault(who, Node(who, f"grantor of {mandate_id} ({found.grantor_lei})"))
