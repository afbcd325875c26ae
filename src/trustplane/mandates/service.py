"""The mandate service: creation (from consent or by an administrator), acceptance, amendment,
suspension, resumption, revocation, and the usability check every delegated token goes through.

Each change is one transaction: the mandate rows, the history row, the audit event (with mandate id
and version) and, for changes that affect live tokens, the signed security event in the outbox.

Hot path (:meth:`MandateService.check_usable`, called at code redemption, refresh and
introspection): an in-memory LRU of mandate heads (status, current version, dates) and of immutable
versions. Expiry is computed from the clock at every check, never cached. A change made by this
process updates the cache when it commits, so it takes effect here at once; a change made by another
process bumps the ``mandates`` generation counter and every process drops its cached heads within
``TRUSTPLANE_CACHE_REFRESH_INTERVAL`` (default 1 s). A miss costs one primary-key read.
"""

from __future__ import annotations

import functools
import getpass
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane import metrics
from trustplane.audit.sink import write_events
from trustplane.clients.model import Client
from trustplane.clients.service import ClientRegistry
from trustplane.mandates import events as sets
from trustplane.mandates.errors import (
    MandateConflictError,
    MandateInvalidError,
    MandateNotFoundError,
    MandateStateError,
    MandateUnusableError,
)
from trustplane.mandates.expiry import notify_expired
from trustplane.mandates.model import (
    LegalBasis,
    Mandate,
    MandateAction,
    MandateChange,
    MandateFilter,
    MandateStatus,
    MandateTerms,
    resolve_status,
)
from trustplane.mandates.store import Head, SqlMandateStore, Version
from trustplane.mandates.terms import as_mandate, audit_event, check_text, new_version, terms_of
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage import generations
from trustplane.storage.db import Database

log = structlog.get_logger("trustplane.mandates")
GENERATION = "mandates"
#: What each action requires of the recorded status, and what it leaves.
_TRANSITIONS = {
    MandateAction.ACCEPTED: ({MandateStatus.PROPOSED}, MandateStatus.ACTIVE),
    MandateAction.SUSPENDED: ({MandateStatus.ACTIVE}, MandateStatus.SUSPENDED),
    MandateAction.RESUMED: ({MandateStatus.SUSPENDED}, MandateStatus.ACTIVE),
    MandateAction.REVOKED: (
        {MandateStatus.PROPOSED, MandateStatus.ACTIVE, MandateStatus.SUSPENDED},
        MandateStatus.REVOKED,
    ),
}


MANDATE_ID = re.compile(r"mdt_[0-9a-f]{24}")


def _check_id(mandate_id: str) -> None:
    if not MANDATE_ID.fullmatch(mandate_id):
        shown = mandate_id[:64] if mandate_id.isprintable() else repr(mandate_id[:64])
        raise MandateNotFoundError(f"no mandate {shown}")


def _unusable_reason(head: Head | None, version: int, now: int) -> str | None:
    if head is None or not 1 <= version <= head.current_version:
        return "not_found"
    status = resolve_status(head.status, version, head.current_version, head.effective_until, now)
    if status is not MandateStatus.ACTIVE:
        return status.value
    return "not_yet_effective" if now < head.effective_from else None


@functools.lru_cache(maxsize=16)
def _checks(outcome: str) -> Counter:
    """The usability counter's series for ``outcome``, looked up once (a ``labels()`` lookup costs
    more than the increment; the outcomes are the few :class:`MandateStatus` values and
    ``not_found``, ``not_yet_effective``, ``usable``)."""
    return metrics.MANDATE_CHECKS.labels(outcome=outcome)


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"


def now_s() -> int:
    return int(time.time())


@dataclass(frozen=True, slots=True)
class MandateHistory:
    versions: list[Mandate]
    changes: list[MandateChange]


class MandateService:
    def __init__(
        self,
        db: Database,
        store: SqlMandateStore,
        settings: Settings,
        registry: AuthorizationDetailsRegistry,
        clients: ClientRegistry,
        security_events: sets.SecurityEvents,
    ) -> None:
        self._db, self._store, self._settings = db, store, settings
        self._registry, self._clients, self.events = registry, clients, security_events
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._versions: OrderedDict[tuple[str, int], Version] = OrderedDict()

    # ------------------------------------------------------------------ hot path

    async def check_usable(self, mandate_id: str, version: int, now: int | None = None) -> Mandate:
        """The mandate version, if it can back a token at ``now``; else :class:`MandateUnusableError`
        (``.to_oauth()`` is the ``invalid_grant`` to answer with)."""
        now = now_s() if now is None else now
        terms, head = await self._usable(mandate_id, version, now)
        return as_mandate(terms, head, now)

    async def usable_terms(self, mandate_id: str, version: int, now: int | None = None) -> Version:
        """:meth:`check_usable`'s check, answering with the version's immutable terms (the cached
        :class:`~trustplane.mandates.store.Version`) instead of a :class:`Mandate` built for the
        caller: for a caller that reads the parties, not the status (token exchange)."""
        return (await self._usable(mandate_id, version, now_s() if now is None else now))[0]

    async def is_usable(self, mandate_id: str, version: int, now: int | None = None) -> bool:
        try:
            await self._usable(mandate_id, version, now_s() if now is None else now)
        except MandateUnusableError:
            return False
        return True

    async def _usable(self, mandate_id: str, version: int, now: int) -> tuple[Version, Head]:
        """The one usability check (counted by outcome): the version and the head it was checked
        against, or :class:`MandateUnusableError`."""
        head = await self._head(mandate_id)
        reason = _unusable_reason(head, version, now)
        _checks(reason or "usable").inc()
        if head is None or reason is not None:
            raise MandateUnusableError(mandate_id, version, reason or "not_found")
        return await self._version(mandate_id, version), head

    def invalidate(self) -> None:
        """Another process changed a mandate: forget cached heads (versions never change)."""
        self._heads.clear()

    async def _head(self, mandate_id: str) -> Head | None:
        if not MANDATE_ID.fullmatch(mandate_id):
            return None  # never a database round trip (nor a NUL byte sent to PostgreSQL)
        head = self._heads.get(mandate_id)
        if head is not None:
            self._heads.move_to_end(mandate_id)
            return head
        async with self._db.read() as conn:
            head = await self._store.head(conn, mandate_id)
        if head is not None:
            self._remember_head(head)
        return head

    async def _version(self, mandate_id: str, version: int) -> Version:
        cached = self._versions.get((mandate_id, version))
        if cached is not None:
            return cached
        async with self._db.read() as conn:
            found = await self._store.versions(conn, mandate_id, version)
        if not found:
            raise MandateNotFoundError(f"no mandate {mandate_id} v{version}")
        self._remember(self._versions, (mandate_id, version), found[0])
        return found[0]

    def _remember_head(self, head: Head) -> None:
        self._remember(self._heads, head.id, head)

    def _remember(self, cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._settings.mandate_cache_size:
            cache.popitem(last=False)

    # ------------------------------------------------------------------ reads

    async def get(
        self, mandate_id: str, version: int | None = None, now: int | None = None
    ) -> Mandate:
        _check_id(mandate_id)
        async with self._db.read() as conn:
            head = await self._store.head(conn, mandate_id)
            if head is None:
                raise MandateNotFoundError(f"no mandate {mandate_id}")
            found = await self._store.versions(conn, mandate_id, version or head.current_version)
        if not found:
            raise MandateNotFoundError(f"no mandate {mandate_id} v{version}")
        return as_mandate(found[0], head, now_s() if now is None else now)

    async def list(self, flt: MandateFilter | None = None, now: int | None = None) -> list[Mandate]:
        """Current versions of the mandates matching ``flt``, newest first."""
        now = now_s() if now is None else now
        async with self._db.read() as conn:
            heads = await self._store.heads(conn, flt or MandateFilter(), now)
            out = []
            for head in heads:
                version = (await self._store.versions(conn, head.id, head.current_version))[0]
                out.append(as_mandate(version, head, now))
        return out

    async def history(self, mandate_id: str, now: int | None = None) -> MandateHistory:
        now = now_s() if now is None else now
        _check_id(mandate_id)
        async with self._db.read() as conn:
            head = await self._store.head(conn, mandate_id)
            if head is None:
                raise MandateNotFoundError(f"no mandate {mandate_id}")
            versions = await self._store.versions(conn, mandate_id)
            changes = await self._store.changes(conn, mandate_id)
        return MandateHistory([as_mandate(v, head, now) for v in versions], changes)

    async def find_covering(
        self,
        grantor_lei: str,
        client_id: str,
        scopes: Sequence[str],
        authorization_details: Sequence[dict[str, Any]],
        now: int | None = None,
        grantor_person: str | None = None,
    ) -> Mandate | None:
        """The newest usable mandate of ``grantor_lei`` for ``client_id`` whose scopes include
        ``scopes`` and whose details cover ``authorization_details`` (structurally, see
        :meth:`AuthorizationDetailsRegistry.covers`). With ``grantor_person``, only mandates that
        person granted, or entity-level ones (no person), qualify."""
        now = now_s() if now is None else now
        flt = MandateFilter(grantor_lei, client_id, MandateStatus.ACTIVE)
        for mandate in await self.list(flt, now):
            other_person = mandate.grantor_person not in (None, grantor_person)
            if mandate.effective_from > now or (grantor_person is not None and other_person):
                continue
            if set(scopes) <= set(mandate.scopes) and self._registry.covers(
                mandate.authorization_details, authorization_details
            ):
                return mandate
        return None

    # ------------------------------------------------------------------ writes

    async def create_from_consent(
        self,
        *,
        grantor_lei: str,
        grantor_person: str,
        client: Client,
        scopes: Sequence[str],
        authorization_details: Sequence[dict[str, Any]],
        accepted_by: str,
        effective_until: int | None = None,
        effective_from: int | None = None,
        legal_basis: LegalBasis = LegalBasis.MANDATE,
        document_ref: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> Mandate:
        """A person approved a consent page: the mandate is accepted and active at once (``conn``:
        see :meth:`create`)."""
        now = now_s()
        until = effective_until or now + self._settings.mandate_default_lifetime
        terms = MandateTerms(
            grantor_lei=grantor_lei,
            grantee_client_id=client.client_id,
            scopes=tuple(scopes),
            authorization_details=tuple(authorization_details),
            effective_from=effective_from,
            effective_until=until,
            legal_basis=legal_basis,
            document_ref=document_ref,
            grantor_person=grantor_person,
        )
        return await self.create(
            terms, actor=f"user:{accepted_by}", accepted_by=accepted_by, conn=conn
        )

    async def create(
        self,
        terms: MandateTerms,
        *,
        actor: str,
        accepted_by: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> Mandate:
        """A new mandate, version 1: active if ``accepted_by`` is given, else proposed (waiting for
        :meth:`accept`). ``conn``: written in the caller's transaction (the consent page's, with
        the code it backs), which commits it; this process's cache then reads its head on first
        use instead of being told before the commit."""
        now = now_s()
        check_text(actor=actor, accepted_by=accepted_by)
        mandate_id = "mdt_" + secrets.token_hex(12)
        version = new_version(
            self._registry, self._clients, mandate_id, 1, terms, actor, accepted_by, now
        )
        status = MandateStatus.ACTIVE if accepted_by else MandateStatus.PROPOSED
        head = Head(
            mandate_id, 1, status, None, version.grantor_lei, version.grantee_client_id,
            version.effective_from, version.effective_until, now, now,
        )  # fmt: skip
        change = MandateChange(mandate_id, 1, MandateAction.CREATED, status, actor, None, now)
        event = audit_event(self._settings.issuer, version, change)
        if conn is not None:
            await self._store.save(conn, head, version, change)
            await write_events(conn, [event])
        else:
            async with self._db.transaction() as own:
                await self._store.save(own, head, version, change)
                await write_events(own, [event])
            self._remember_head(head)
        metrics.MANDATE_CHANGES.labels(action=MandateAction.CREATED.value).inc()
        log.info("mandate_created", mandate_id=mandate_id, status=status.value)
        return as_mandate(version, head, now)

    async def accept(self, mandate_id: str, *, accepted_by: str, actor: str) -> Mandate:
        return await self._transition(mandate_id, MandateAction.ACCEPTED, actor, None, accepted_by)

    async def suspend(self, mandate_id: str, *, actor: str, reason: str | None = None) -> Mandate:
        return await self._transition(mandate_id, MandateAction.SUSPENDED, actor, reason)

    async def resume(self, mandate_id: str, *, actor: str, reason: str | None = None) -> Mandate:
        return await self._transition(mandate_id, MandateAction.RESUMED, actor, reason)

    async def revoke(self, mandate_id: str, *, actor: str, reason: str | None = None) -> Mandate:
        """Final. Live tokens go inactive at introspection and refresh is refused at once."""
        return await self._transition(mandate_id, MandateAction.REVOKED, actor, reason)

    async def amend(
        self,
        mandate_id: str,
        *,
        actor: str,
        changes: dict[str, Any],
        expected_version: int | None = None,
        accepted_by: str | None = None,
        reason: str | None = None,
    ) -> Mandate:
        """A new version with ``changes`` (any of scopes, authorization_details, effective_from,
        effective_until, legal_basis, document_ref, revocation_path) applied to the current terms.
        The previous version is superseded: its tokens stay attributed to it but are no longer
        usable. ``expected_version`` (optimistic concurrency) raises :class:`MandateConflictError`
        when the mandate has moved on; without it, racing amendments apply one after the other."""
        allowed = {"scopes", "authorization_details", "effective_from", "effective_until",
                   "legal_basis", "document_ref", "revocation_path"}  # fmt: skip
        unknown = set(changes) - allowed
        if unknown:
            raise MandateInvalidError(f"cannot amend {', '.join(sorted(unknown))}")
        now = now_s()
        check_text(actor=actor, accepted_by=accepted_by, reason=reason)
        async with self._db.transaction() as conn:
            head = await self._locked(conn, mandate_id)
            if expected_version is not None and head.current_version != expected_version:
                raise MandateConflictError(
                    f"mandate {mandate_id} is at version {head.current_version}, not {expected_version}"
                )
            if head.status is MandateStatus.REVOKED:
                raise MandateStateError(f"mandate {mandate_id} is revoked and cannot be amended")
            old = (await self._store.versions(conn, mandate_id, head.current_version))[0]
            terms = terms_of(old, changes)
            number = head.current_version + 1
            version = new_version(
                self._registry, self._clients, mandate_id, number, terms, actor, accepted_by, now
            )
            new_head = replace(
                head, current_version=number, effective_from=version.effective_from,
                effective_until=version.effective_until, updated_at=now, status_reason=reason,
                expiry_notified_at=None,
            )  # fmt: skip
            change = MandateChange(
                mandate_id, number, MandateAction.AMENDED, head.status, actor, reason, now
            )
            await self._store.save(conn, new_head, version, change)
            await write_events(
                conn, [audit_event(self._settings.issuer, version, change, old.version)]
            )
            previous = as_mandate(old, new_head, now)
            claims = {"mandate_version": number, "mandate_status": MandateStatus.SUPERSEDED.value}
            await self._security_event(conn, previous, sets.TOKEN_CLAIMS_CHANGE, reason, claims)
            await generations.bump(conn, GENERATION)
        return await self._committed(new_head, version, now, MandateAction.AMENDED)

    async def _transition(
        self,
        mandate_id: str,
        action: MandateAction,
        actor: str,
        reason: str | None,
        accepted_by: str | None = None,
    ) -> Mandate:
        sources, target = _TRANSITIONS[action]
        now = now_s()
        check_text(actor=actor, reason=reason, accepted_by=accepted_by)
        async with self._db.transaction() as conn:
            head = await self._locked(conn, mandate_id)
            if head.status not in sources:
                raise MandateStateError(
                    f"mandate {mandate_id} is {head.status.value}: cannot {action.value[:-1]}"
                    if action is not MandateAction.ACCEPTED
                    else f"mandate {mandate_id} is {head.status.value}: only a proposed one can be accepted"
                )
            if accepted_by is not None:
                await self._store.set_acceptance(
                    conn, mandate_id, head.current_version, accepted_by, now
                )
            new_head = replace(head, status=target, status_reason=reason, updated_at=now)
            change = MandateChange(
                mandate_id, head.current_version, action, target, actor, reason, now
            )
            await self._store.save(conn, new_head, None, change)
            version = (await self._store.versions(conn, mandate_id, head.current_version))[0]
            await write_events(conn, [audit_event(self._settings.issuer, version, change)])
            mandate = as_mandate(version, new_head, now)
            if action is MandateAction.REVOKED:
                await self._security_event(conn, mandate, sets.SESSION_REVOKED, reason)
            elif action is not MandateAction.ACCEPTED:
                claims = {"mandate_status": target.value}
                await self._security_event(conn, mandate, sets.TOKEN_CLAIMS_CHANGE, reason, claims)
            await generations.bump(conn, GENERATION)
        self._versions.pop((mandate_id, head.current_version), None)  # acceptance filled in
        return await self._committed(new_head, version, now, action)

    async def _locked(self, conn: AsyncConnection, mandate_id: str) -> Head:
        _check_id(mandate_id)
        head = await self._store.lock(conn, mandate_id)
        if head is None:
            raise MandateNotFoundError(f"no mandate {mandate_id}")
        return head

    async def _committed(
        self, head: Head, version: Version, now: int, action: MandateAction
    ) -> Mandate:
        """After commit: this process sees the change at once; others via the generation."""
        self._remember_head(head)
        metrics.MANDATE_CHANGES.labels(action=action.value).inc()
        await self.publish_events()
        log.info("mandate_changed", mandate_id=head.id, version=head.current_version,
                 status=head.status.value)  # fmt: skip
        return as_mandate(version, head, now)

    async def notify_expired(self, now: int | None = None) -> int:
        """Maintenance: announce newly expired mandates (see :mod:`trustplane.mandates.expiry`)."""
        now = now_s() if now is None else now
        done = await notify_expired(self._db, self._store, self.events, self._settings.issuer, now)
        if done:
            await self.publish_events()
        return done

    async def publish_events(self) -> int:
        try:
            return await self.events.publish_pending(self._db)
        except Exception as exc:  # the outbox keeps them; maintenance retries
            log.warning("security_events_not_published", error=repr(exc))
            return 0

    async def _security_event(
        self,
        conn: AsyncConnection,
        mandate: Mandate,
        event_type: str,
        reason: str | None,
        claims: dict[str, Any] | None = None,
    ) -> None:
        jti, token = self.events.build(
            mandate, event_type, initiator="admin", reason=reason, claims=claims
        )
        await self.events.record(conn, mandate, event_type, jti, token)
