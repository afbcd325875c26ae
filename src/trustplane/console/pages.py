"""Page data for Mandates, Clients, Partners and Policy: reads through the services, and the diffs
shown between versions (field by field for mandates and profiles, line by line for bundle files)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from trustplane.audit.ledger import Ledger, LedgerError
from trustplane.audit_events import AuditEventType
from trustplane.clients.model import Client
from trustplane.clients.service import ClientService
from trustplane.federation.service import FederationService
from trustplane.federation.store import StoredProfile
from trustplane.mandates.errors import MandateError
from trustplane.mandates.model import Mandate, MandateFilter, MandateStatus
from trustplane.mandates.service import MandateHistory, MandateService
from trustplane.policy.service import PolicyService
from trustplane.policy.store import Activation, BundleRecord
from trustplane.users.service import UserService

MANDATE_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
LEI = re.compile(r"^[A-Z0-9]{20}$")
SEARCH_LIMIT = 50


@dataclass(frozen=True, slots=True)
class Change:
    field: str
    before: str
    after: str


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def field_changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[Change]:
    """Fields whose value differs (every field of ``after`` when there is no ``before``)."""
    names = list(dict.fromkeys([*(before or {}), *after]))
    old = before or {}
    return [
        Change(n, _text(old.get(n)), _text(after.get(n)))
        for n in names
        if before is None or old.get(n) != after.get(n)
    ]


MANDATE_FIELDS = (
    "scopes",
    "authorization_details",
    "effective_from",
    "effective_until",
    "legal_basis",
    "document_ref",
    "grantor",
    "grantee",
    "revocation_path",
)


def _day(ts: int | None) -> str:
    if ts is None:
        return "open-ended"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def mandate_terms(m: Mandate) -> dict[str, Any]:
    full = m.to_dict()
    terms = {name: full[name] for name in MANDATE_FIELDS}
    terms["effective_from"] = _day(m.effective_from)
    terms["effective_until"] = _day(m.effective_until)
    return terms


@dataclass
class MandateView:
    current: Mandate
    history: MandateHistory
    #: (version, what changed from the previous version)
    diffs: list[tuple[Mandate, list[Change]]]
    #: user id -> display name, for the people in the history
    names: dict[str, str]


class Pages:
    def __init__(
        self,
        mandates: MandateService,
        clients: ClientService,
        federation: FederationService,
        policy: PolicyService,
        ledger: Ledger,
        users: UserService,
    ) -> None:
        self._mandates, self._clients, self._federation = mandates, clients, federation
        self._policy, self._ledger, self._users = policy, ledger, users

    # ------------------------------------------------------------------ mandates

    async def search_mandates(self, q: str, status: str) -> list[Mandate]:
        """``q``: a mandate id, a grantor LEI or a client id; ``status`` one of MandateStatus."""
        q = q.strip()
        wanted = MandateStatus(status) if status in set(MandateStatus) else None
        if q and MANDATE_ID.fullmatch(q) and not LEI.fullmatch(q.upper()):
            try:
                found = await self._mandates.get(q)
            except MandateError:  # not a mandate id: try it as a client id below
                found = None
            if found is not None:
                return [found] if wanted in (None, found.status) else []
        flt = MandateFilter(status=wanted, limit=SEARCH_LIMIT)
        if q and LEI.fullmatch(q.upper()):
            flt = MandateFilter(grantor_lei=q.upper(), status=wanted, limit=SEARCH_LIMIT)
        elif q:
            flt = MandateFilter(grantee_client_id=q[:128], status=wanted, limit=SEARCH_LIMIT)
        return await self._mandates.list(flt)

    async def mandate(self, mandate_id: str) -> MandateView:
        history = await self._mandates.history(mandate_id)
        diffs: list[tuple[Mandate, list[Change]]] = []
        previous: dict[str, Any] | None = None
        for version in history.versions:
            terms = mandate_terms(version)
            diffs.append((version, field_changes(previous, terms)))
            previous = terms
        current = await self._mandates.get(mandate_id)
        people = {c.actor for c in history.changes} | {
            v.grantor_person or "" for v in history.versions
        }
        names = {}
        for user_id in sorted(p for p in people if p.startswith("u_")):
            user = await self._users.by_id(user_id)
            if user is not None:
                names[user_id] = user.display_name
        return MandateView(current, history, diffs, names)

    # ------------------------------------------------------------------ clients, partners

    async def clients(self) -> list[Client]:
        return sorted(await self._clients.list(), key=lambda c: c.created_at, reverse=True)

    async def client(self, client_id: str) -> tuple[Client, list[dict[str, Any]]]:
        """The client and its registration history from the ledger (newest first), each entry with
        what changed from the one before (the ledger keeps the scopes, the LEI and the status)."""
        client = await self._clients.get(client_id)
        events = await self._events({"client_id": client_id}, "oauth:client:")
        for event, before in zip(events, [*events[1:], None], strict=True):
            terms = {k: event.get(k) for k in ("scopes", "lei", "status")}
            previous = {k: before.get(k) for k in terms} if before is not None else None
            event["changes"] = field_changes(previous, terms)
        return client, events

    async def partners(self) -> list[StoredProfile]:
        return await self._federation.current()

    async def partner(
        self, partner_id: str
    ) -> tuple[StoredProfile, list[tuple[StoredProfile, list[Change]]], dict[str, Any] | None]:
        """The current profile, every version with what changed, and the last conformance run
        recorded by the console (None: never run from the console)."""
        history = sorted(await self._federation.history(partner_id), key=lambda p: p.version)
        diffs: list[tuple[StoredProfile, list[Change]]] = []
        previous: dict[str, Any] | None = None
        for version in history:
            diffs.append((version, field_changes(previous, version.document)))
            previous = version.document
        runs = await self._events({"partner": partner_id}, AuditEventType.CONSOLE_ACTION.value)
        last = next((r for r in runs if r.get("action") == "partner:conformance"), None)
        return history[-1], list(reversed(diffs)), last

    async def _events(self, filters: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
        try:
            _, found = await self._ledger.search(filters, 0, 500)
        except LedgerError:
            return []
        out = []
        for proven in reversed(found):
            entry = orjson.loads(proven.entry.entry)
            if str(entry.get("type", "")).startswith(prefix):
                payload = orjson.loads(proven.entry.payload) if proven.entry.payload else {}
                out.append({**entry, **payload, "index": proven.entry.index})
        return out

    # ------------------------------------------------------------------ policy

    async def policy(self) -> tuple[list[BundleRecord], list[Activation], str | None]:
        bundles, activations = await self._policy.list()
        return bundles, activations, self._policy.engine.version

    async def bundle_diff(self, old: str, new: str) -> list[tuple[str, list[str]]]:
        """Unified diffs per file between two published bundles (files only in one side too)."""
        a, b = await self._policy.get(old), await self._policy.get(new)
        files_a = dict(a.source.files) if a.source else {}
        files_b = dict(b.source.files) if b.source else {}
        out = []
        for name in sorted({*files_a, *files_b}):
            lines = list(
                difflib.unified_diff(
                    files_a.get(name, "").splitlines(),
                    files_b.get(name, "").splitlines(),
                    f"{a.version[:12]}/{name}",
                    f"{b.version[:12]}/{name}",
                    lineterm="",
                )
            )
            if lines:
                out.append((name, lines))
        return out
