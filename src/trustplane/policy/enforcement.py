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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from trustplane import metrics
from trustplane.audit_events import AuditEvent
from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.clients.model import Client
from trustplane.errors import InvalidScopeError
from trustplane.policy.engine import TOKEN_ACTION, PolicyEngine
from trustplane.policy.recorder import DecisionRecord

log = structlog.get_logger("trustplane.policy")
CACHE_SIZE = 4096
_Key = tuple[str, str, int, str, frozenset[str], tuple[str, ...], str, str]


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


@dataclass(frozen=True, slots=True)
class _Cached:
    records: tuple[DecisionRecord, ...]


def token_requests(
    client: Client,
    scopes: Sequence[str],
    audience: str,
    grant_type: str,
    correlation_id: str | None,
) -> list[DecisionRequest]:
    legal_entity = Entity("LegalEntity", client.lei)
    principal = Entity(
        "Client",
        client.client_id,
        {"legal_entity": legal_entity, "scopes": frozenset(client.scopes)},
        (legal_entity,),
    )
    context = {"audience": audience, "requested_scopes": list(scopes), "grant_type": grant_type}
    return [
        DecisionRequest(
            principal,
            TOKEN_ACTION,
            Entity("Scope", scope, {"name": scope, "audience": audience}),
            context,
            correlation_id,
        )
        for scope in scopes
    ]


class TokenPolicy:
    def __init__(self, engine: PolicyEngine, *, cache_size: int = CACHE_SIZE) -> None:
        self._engine = engine
        self._cache: dict[_Key, _Cached] = {}
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
        """Return the decision records (all allows), or raise :class:`ScopeDenied` carrying them."""
        if not scopes:
            return ()
        key: _Key = (
            self._engine.version,
            client.client_id,
            client.updated_at,
            client.lei,
            client.scopes,
            tuple(scopes),
            audience,
            grant_type,
        )
        cached = self._cache.get(key)
        if cached is not None and correlation_id is None:
            metrics.POLICY_CACHE.labels(result="hit").inc()
            records = tuple(fresh_record(r) for r in cached.records)
            for r in records:
                metrics.POLICY_DECISIONS.labels(decision=r.event.decision or "deny").inc()
        else:
            metrics.POLICY_CACHE.labels(result="miss").inc()
            requests = token_requests(client, scopes, audience, grant_type, correlation_id)
            pairs = self._engine.evaluate(requests)
            records = tuple(r for _, r in pairs)
            if correlation_id is None and cacheable(records, key[0]):
                self._remember(key, _Cached(records))
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

    def _remember(self, key: _Key, value: _Cached) -> None:
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # a bounded cache; a full one starts over (keys are cheap to rebuild)
        self._cache[key] = value

    def clear(self) -> None:
        self._cache.clear()


def cacheable(records: Sequence[DecisionRecord], version: str) -> bool:
    """Only real policy outcomes of the version the key names: a fail-closed deny (engine error,
    no bundle, ...) may be transient and must be decided again next time."""
    return all(r.event.reason is None and r.event.policy_bundle_version == version for r in records)


def fresh_record(record: DecisionRecord) -> DecisionRecord:
    """The same decision, recorded again as its own event (own id and time)."""
    e = record.event
    event = AuditEvent(
        type=e.type,
        issuer=e.issuer,
        subject=e.subject,
        client_id=e.client_id,
        correlation_id=e.correlation_id,
        decision=e.decision,
        reason=e.reason,
        reason_ids=e.reason_ids,
        policy_bundle_version=e.policy_bundle_version,
        service=e.service,
        payload={**e.payload, "cached": True},
        event_id=os.urandom(16).hex(),
    )
    return DecisionRecord(event, record.action, record.resource, 0, record.inputs)


def decision_of(record: DecisionRecord) -> Decision:
    e = record.event
    return Decision(
        e.decision == "allow", e.reason_ids, e.policy_bundle_version or "none", e.event_id
    )
