"""Enforcement at the authorization server: may this client obtain these scopes for this audience?

Every grant calls :meth:`TokenPolicy.check` after it has chosen the audience and the scopes and before
it signs. One Cedar request per scope (``Action::"token:obtain"`` on ``Scope::"<name>"``), evaluated in
one batch. The decisions are not written here: the returned records ride in the token endpoint's own
outcome transaction (``oauth.outcomes``), next to the issuance or the refusal.

Caching. A ``token:obtain`` request is built from nothing but the key ``(bundle version, client id,
client registration time, legal entity, registered scopes, requested scopes, audience, grant type)``
and Cedar evaluation is a pure function of its request (it has no clock, no I/O), so the outcome for
a key can be reused. A bundle switch changes the version, a registration update changes
``updated_at``; both miss the cache. Every decision is still recorded with its own decision id.

A token exchange (RFC 8693) asks :meth:`TokenPolicy.check_exchange` instead: ``token:exchange`` with
the exchange's context, cached the same way under a key that adds everything that context is built
from. One cache, one set of metrics (``trustplane_policy_token_cache_total``,
``trustplane_policy_decisions_total``) for both.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import Any

import structlog

from trustplane import metrics
from trustplane.audit_events import AuditEvent, new_event_id
from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.clients.model import Client
from trustplane.errors import InvalidScopeError
from trustplane.policy.engine import EXCHANGE_ACTION, TOKEN_ACTION, PolicyEngine
from trustplane.policy.recorder import DecisionRecord

log = structlog.get_logger("trustplane.policy")
CACHE_SIZE = 4096
#: A cache key: the action, then everything the action's requests are built from.
_Key = tuple[Hashable, ...]
#: The series counted on every token request, looked up once (``labels()`` costs more than ``inc()``)
_CACHE_HIT = metrics.POLICY_CACHE.labels(result="hit")
_CACHE_MISS = metrics.POLICY_CACHE.labels(result="miss")
_ALLOWED = metrics.POLICY_DECISIONS.labels(decision="allow")
_DENIED = metrics.POLICY_DECISIONS.labels(decision="deny")


class ScopeDenied(InvalidScopeError):
    """RFC 6749 §5.2 ``invalid_scope``: the policy refused a requested scope. ``records`` are the
    decisions to make durable with the refusal."""

    def __init__(self, records: Sequence[DecisionRecord], denied: Sequence[Decision]) -> None:
        reasons = sorted({r for d in denied for r in d.reason_ids})
        super().__init__(
            "the requested scope is not permitted by policy",
            debug=f"policy deny: {' '.join(reasons)} (bundle {denied[0].bundle_version[:12]})",
        )
        self.records = tuple(records)
        self.denied = tuple(denied)


def client_principal(client: Client) -> Entity:
    """The requesting client as the principal of a token request."""
    legal_entity = Entity("LegalEntity", client.lei)
    return Entity(
        "Client",
        client.client_id,
        {"legal_entity": legal_entity, "scopes": frozenset(client.scopes)},
        (legal_entity,),
    )


def scope_requests(
    client: Client,
    action: str,
    scopes: Sequence[str],
    audience: str,
    context: dict[str, Any],
    correlation_id: str | None = None,
) -> list[DecisionRequest]:
    """One request per scope, on ``Scope::"<name>"``, all with the same context."""
    principal = client_principal(client)
    return [
        DecisionRequest(
            principal,
            action,
            Entity("Scope", scope, {"name": scope, "audience": audience}),
            context,
            correlation_id,
        )
        for scope in scopes
    ]


def token_requests(
    client: Client,
    scopes: Sequence[str],
    audience: str,
    grant_type: str,
    correlation_id: str | None,
) -> list[DecisionRequest]:
    context = {"audience": audience, "requested_scopes": list(scopes), "grant_type": grant_type}
    return scope_requests(client, TOKEN_ACTION, scopes, audience, context, correlation_id)


class TokenPolicy:
    """The one policy check of the token endpoint, asked by every grant. ``engine`` None: token
    enforcement is off (``TRUSTPLANE_POLICY_TOKEN_ENFORCEMENT=false``), every check allows and
    records nothing."""

    def __init__(self, engine: PolicyEngine | None, *, cache_size: int = CACHE_SIZE) -> None:
        self._engine = engine
        self._cache: dict[_Key, tuple[DecisionRecord, ...]] = {}
        self._cache_size = cache_size

    def check(
        self,
        client: Client,
        scopes: Sequence[str],
        audience: str,
        grant_type: str,
        *,
        correlation_id: str | None = None,
    ) -> tuple[DecisionRecord, ...]:
        """``token:obtain``: return the decision records (all allows), or raise
        :class:`ScopeDenied` carrying them."""
        engine = self._engine
        if engine is None or not scopes:
            return ()
        key: _Key = (
            TOKEN_ACTION,
            engine.version,
            client.client_id,
            client.updated_at,
            client.lei,
            client.scopes,
            tuple(scopes),
            audience,
            grant_type,
        )
        records = self._decide(
            engine,
            key,
            lambda: token_requests(client, scopes, audience, grant_type, correlation_id),
            cache=correlation_id is None,
        )
        denied = [decision_of(r) for r in records if r.event.decision != "allow"]
        if denied:
            log.info(
                "policy_token_scope_denied",
                client_id=client.client_id,
                audience=audience,
                scopes=[r.resource for r in records if r.event.decision != "allow"],
                reason_ids=sorted({i for d in denied for i in d.reason_ids}),
                bundle_version=denied[0].bundle_version,
            )
            raise ScopeDenied(records, denied)
        return records

    def check_exchange(
        self,
        client: Client,
        scopes: Sequence[str],
        audience: str,
        context: dict[str, Any],
        inputs: tuple[Hashable, ...],
        *,
        transaction_id: str,
    ) -> tuple[DecisionRecord, ...]:
        """``token:exchange`` (RFC 8693), one request per scope with ``context``; ``inputs`` is
        everything besides the client, the scopes and the audience that ``context`` is built from
        (the cache key). The records name ``transaction_id``: the ledger's per-transaction view
        lists them. Return them (all allows), or raise :class:`ScopeDenied` carrying them."""
        engine = self._engine
        if engine is None:
            return ()
        key: _Key = (
            EXCHANGE_ACTION,
            engine.version,
            client.client_id,
            client.updated_at,
            client.lei,
            client.scopes,
            tuple(scopes),
            audience,
            *inputs,
        )
        records = self._decide(
            engine,
            key,
            lambda: scope_requests(client, EXCHANGE_ACTION, scopes, audience, context),
            cache=True,
            transaction_id=transaction_id,
        )
        denied = [decision_of(r) for r in records if r.event.decision != "allow"]
        if denied:
            raise ScopeDenied(records, denied)
        return records

    def _decide(
        self,
        engine: PolicyEngine,
        key: _Key,
        requests: Callable[[], list[DecisionRequest]],
        *,
        cache: bool,
        transaction_id: str | None = None,
    ) -> tuple[DecisionRecord, ...]:
        """Cedar is a pure function of its request: the records of an earlier evaluation of the
        same key are reused (each recorded again as its own decision). ``transaction_id``: what
        the records name (the decision does not depend on it)."""
        cached = self._cache.get(key) if cache else None
        if cached is not None:
            _CACHE_HIT.inc()
            records = tuple(fresh_record(r, transaction_id) for r in cached)
            for r in records:
                (_ALLOWED if r.event.decision == "allow" else _DENIED).inc()
            return records
        _CACHE_MISS.inc()
        records = tuple(r for _, r in engine.evaluate(requests()))
        if transaction_id is not None:
            records = tuple(
                replace(r, event=replace(r.event, transaction_id=transaction_id)) for r in records
            )
        if cache and cacheable(records, engine.version):
            self._remember(key, records)
        return records

    def _remember(self, key: _Key, value: tuple[DecisionRecord, ...]) -> None:
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # a bounded cache; a full one starts over (keys are cheap to rebuild)
        self._cache[key] = value

    def clear(self) -> None:
        self._cache.clear()


def cacheable(records: Sequence[DecisionRecord], version: str) -> bool:
    """Only real policy outcomes of the version the key names: a fail-closed deny (engine error,
    no bundle, ...) may be transient and must be decided again next time."""
    return all(r.event.reason is None and r.event.policy_bundle_version == version for r in records)


def fresh_record(record: DecisionRecord, transaction_id: str | None = None) -> DecisionRecord:
    """The same decision, recorded again as its own event (own id and time), naming
    ``transaction_id``."""
    e = record.event
    event = AuditEvent(
        type=e.type,
        issuer=e.issuer,
        subject=e.subject,
        client_id=e.client_id,
        transaction_id=transaction_id,
        correlation_id=e.correlation_id,
        decision=e.decision,
        reason=e.reason,
        reason_ids=e.reason_ids,
        policy_bundle_version=e.policy_bundle_version,
        service=e.service,
        payload={**e.payload, "cached": True},
        event_id=new_event_id(),
    )
    return DecisionRecord(event, record.action, record.resource, 0, record.inputs)


def decision_of(record: DecisionRecord) -> Decision:
    e = record.event
    return Decision(
        e.decision == "allow", e.reason_ids, e.policy_bundle_version or "none", e.event_id
    )
