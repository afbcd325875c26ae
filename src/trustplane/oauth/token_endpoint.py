"""The token endpoint (RFC 6749 §3.2): authenticate the client, dispatch on ``grant_type``, issue.

The grants it serves are given to its constructor (``oauth.grant.TokenGrant``); each decides and
signs, and says what must still hold when the outcome is committed (``oauth.outcomes``).

Every outcome is an audit event, durable before the response: ``oauth:token:issued`` with the token's
jti, audience and scopes (and the sender binding: ``binding`` and the ``cnf`` thumbprint), or
``oauth:token:refused`` with the wire error and the log-only reason.

Sender binding (docs/sender_constrained.md): before the grant runs, the endpoint verifies the
request's ``DPoP`` proof (RFC 9449 §5; ``htu`` is this endpoint's public URL) and asks
:func:`~trustplane.oauth.certificate_binding.certificate_confirmation` (RFC 8705 §3); the resulting
:class:`~trustplane.grant.binding.Binding` is current while the grant runs, so every grant's token
carries its ``cnf``. The proof's ``jti`` is consumed with the outcome (a ``ConsumeJti`` condition)
when the replay cache is the database, so a proof, the client assertion and the audit record are one
write; with Redis it is consumed at verification. A grant that uses up a code or a refresh token
before the outcome (``commits_before_outcome``, :mod:`trustplane.grant.contract`) gets the
assertion's and the proof's ``jti`` consumed before it runs: a replay refused after the code was
redeemed would have used it up for nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from cryptography import x509
from prometheus_client import Counter

from trustplane import metrics
from trustplane.audit.sink import AuditSink
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.authentication import AuthenticatedClient, ClientAuthenticator
from trustplane.dpop.errors import InvalidDpopProofError
from trustplane.dpop.proof import DpopVerifier
from trustplane.errors import (
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from trustplane.grant.binding import UNBOUND, Binding, bound
from trustplane.grant.contract import Granted, TokenGrant, commits_before_outcome
from trustplane.grant.outcomes import Condition, ConsumeJti, Outcome, OutcomeRecorder
from trustplane.oauth.certificate_binding import certificate_confirmation
from trustplane.policy.enforcement import ScopeDenied
from trustplane.profile import client_is_fapi2
from trustplane.protocol.form import Form
from trustplane.protocol.replay import ReplayUse
from trustplane.settings import Settings

#: RFC 6749 §3.3: ``scope-token = 1*( %x21 / %x23-5B / %x5D-7E )``, delimited by spaces (%x20);
#: a tab, a line break, a quote, a backslash or a non-ASCII character is no part of a scope.
_SCOPE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


def replayed() -> InvalidClientError:
    """RFC 7523 §3 item 7: the assertion's jti was used before."""
    return InvalidClientError("client assertion was already used", debug="jti replay")


def proof_replayed() -> InvalidDpopProofError:
    """RFC 9449 §11.1: the DPoP proof's jti was used before."""
    return InvalidDpopProofError(
        "the DPoP proof has already been used (jti replayed)", debug="dpop_replay"
    )


class TokenEndpoint:
    """Built once, with every grant it serves (``oauth.wiring.build_token_endpoint``)."""

    def __init__(
        self,
        *,
        settings: Settings,
        authenticator: ClientAuthenticator,
        audit: AuditSink,
        outcomes: OutcomeRecorder,
        grants: Sequence[TokenGrant],
        dpop: DpopVerifier | None = None,
        defer_proof_replay: bool = False,
    ) -> None:
        """``dpop``: verifies DPoP proofs (None: a ``DPoP`` header is refused, as unsupported);
        ``defer_proof_replay``: consume proof ``jti``s with the outcome (the replay cache is the
        database, so they can be committed in the outcome's transaction)."""
        self._settings, self._auth = settings, authenticator
        self._dpop, self._defer_proof_replay = dpop, defer_proof_replay
        self._audit, self._outcomes = audit, outcomes
        self._grants: dict[str, TokenGrant] = {}
        for grant in grants:
            if grant.grant_type in self._grants:
                raise ValueError(f"two grants for grant_type {grant.grant_type!r}")
            self._grants[grant.grant_type] = grant

    @property
    def grant_types(self) -> tuple[str, ...]:
        return tuple(self._grants)

    @property
    def dpop(self) -> DpopVerifier | None:
        return self._dpop

    async def handle(
        self,
        form: Form,
        authorization: str | None,
        certificate: x509.Certificate | None = None,
        *,
        dpop_proofs: Sequence[str] = (),
        url: str | None = None,
    ) -> dict[str, Any]:
        """Return the RFC 6749 §5.1 body or raise the typed error (already audited).
        ``dpop_proofs``: the request's ``DPoP`` header values; ``url``: the public URL the request
        was sent to (the ``htu`` a proof must name; default: the issuer's ``/token``)."""
        client: AuthenticatedClient | None = None
        binding = UNBOUND
        grant_type = form.get("grant_type")
        try:
            if grant_type is None:
                raise InvalidRequestError("grant_type is required")
            grant = self._grants.get(grant_type)
            # a grant that uses up a code or a refresh token before the outcome: the request's
            # assertion and proof jtis are consumed first, so a replay cannot burn either
            defer = not commits_before_outcome(grant)
            client = await self._auth.authenticate(
                form, authorization, defer_replay=defer, certificate=certificate
            )
            if grant is None:
                raise UnsupportedGrantTypeError(f"grant_type {grant_type!r} is not supported"[:200])
            if grant_type not in client.client.grant_types:
                raise UnauthorizedClientError(f"this client may not use the {grant.label} grant")
            scope = form.get("scope")
            if scope is not None and not _SCOPE.fullmatch(scope):
                raise InvalidScopeError(
                    "scope must be scope tokens delimited by spaces (RFC 6749 section 3.3)"
                )
            binding = await self._binding(client, dpop_proofs, url, defer)
            if binding.kind == "none" and client_is_fapi2(self._settings, client.client.metadata):
                # FAPI 2.0 §5.3.2.1: only sender-constrained access tokens (DPoP or mTLS)
                raise InvalidRequestError(
                    "this client's profile (fapi2) requires a sender-constrained access token: "
                    "send a DPoP proof (RFC 9449) or authenticate with a client certificate "
                    "(RFC 8705)",
                    reason_id="sender_constraint_required",
                )
            if binding.jkt is None and client.client.metadata.get("dpop_bound_access_tokens"):
                # RFC 9449 §5.2: the client registered dpop_bound_access_tokens; no proof, no token
                raise InvalidDpopProofError(
                    "this client registered dpop_bound_access_tokens (RFC 9449 §5.2): send a "
                    "DPoP proof",
                    debug="dpop_bound_client_without_proof",
                )
            with bound(binding):
                granted = await grant.handle(form, client)
        except OAuth2Error as exc:
            _count_binding_refusal(exc)
            await self._refuse(exc, form, client, grant_type, binding.conditions)
            raise
        if binding.cnf is not None:
            granted = replace(granted, audit={**granted.audit, **binding.audit()})
        conditions = _client_conditions(client) + binding.conditions + granted.conditions
        if not conditions and not granted.decisions:
            await self._audit.emit(self._issued(granted, grant_type))
        else:
            await self._record_issue(granted, conditions, form, client, grant_type)
        for counter in _issued_counters(grant_type, client.client.client_id, binding.kind):
            counter.inc()
        body: dict[str, Any] = {
            "access_token": granted.token.token,
            "token_type": binding.token_type,
            "expires_in": granted.token.expires_in,
            "scope": granted.token.claims["scope"],
        }
        body.update(granted.response)
        return body

    async def _binding(
        self, client: AuthenticatedClient, proofs: Sequence[str], url: str | None, defer: bool
    ) -> Binding:
        """The request's sender binding: the DPoP proof's key (RFC 9449 §5) and/or the client's
        certificate (RFC 8705 §3); raises ``invalid_dpop_proof``, ``use_dpop_nonce`` or, for a
        client that must present a certificate and did not, ``invalid_request``. ``defer``: the
        proof's ``jti`` may be consumed with the outcome (when the replay cache allows it)."""
        cnf = certificate_confirmation(client)
        if not proofs:
            return UNBOUND if cnf is None else Binding(cnf=cnf)
        if self._dpop is None:
            raise InvalidDpopProofError(
                "DPoP is not supported by this server", debug="dpop_unsupported"
            )
        target = url or self._settings.issuer + "/token"
        defer = defer and self._defer_proof_replay
        proof = await self._dpop.verify_for_token_endpoint(
            proofs, "POST", target, consume=not defer
        )
        conditions: tuple[Condition, ...] = ()
        if defer:
            use = ReplayUse(
                self._dpop.replay_key(proof), proof.jti, self._dpop.replay_expiry(proof)
            )
            conditions = (ConsumeJti(use, proof_replayed),)
        return Binding(cnf={**(cnf or {}), "jkt": proof.jkt}, proof=proof, conditions=conditions)

    async def _record_issue(
        self,
        granted: Granted,
        conditions: tuple[Condition, ...],
        form: Form,
        auth: AuthenticatedClient,
        grant_type: str,
    ) -> None:
        """Check the conditions and record the issue in one write; a failed condition refuses."""
        outcome = Outcome(
            event=self._issued(granted, grant_type),
            refused=partial(self._refused, form=form, client=auth, grant_type=grant_type),
            conditions=conditions,
            decisions=granted.decisions,
        )
        failed = await self._outcomes.record(outcome)
        if failed is not None:
            metrics.TOKEN_REFUSED.labels(error=failed.error.error).inc()
            _count_binding_refusal(failed.error)
            raise failed.error

    async def _refuse(
        self,
        exc: OAuth2Error,
        form: Form,
        client: AuthenticatedClient | None,
        grant_type: str | None,
        proof_conditions: tuple[Condition, ...] = (),
    ) -> None:
        """Audit a refusal; an authenticated request still consumes its assertion (and its DPoP
        proof), and a replayed assertion is refused as such (invalid_client) whatever else was
        wrong with the request."""
        refused = self._refused(exc, form, client, grant_type)
        decisions = exc.records if isinstance(exc, ScopeDenied) else ()
        conditions = _client_conditions(client) if client is not None else ()
        conditions += proof_conditions
        if not conditions and not decisions:
            metrics.TOKEN_REFUSED.labels(error=exc.error).inc()
            await self._audit.emit(refused)
            return
        outcome = Outcome(
            event=refused,
            refused=partial(self._refused, form=form, client=client, grant_type=grant_type),
            conditions=conditions,
            decisions=decisions,
        )
        failed = await self._outcomes.record(outcome)
        if failed is None:
            metrics.TOKEN_REFUSED.labels(error=exc.error).inc()
            return
        metrics.TOKEN_REFUSED.labels(error=failed.error.error).inc()
        raise failed.error from exc

    async def refuse_unparsed(self, exc: OAuth2Error) -> None:
        """A body that is not a valid form never reaches :meth:`handle`; it is a refusal all the
        same, and is audited like one."""
        metrics.TOKEN_REFUSED.labels(error=exc.error).inc()
        await self._audit.emit(self._refused(exc, Form({}, {}), None, None))

    def _issued(self, granted: Granted, grant_type: str) -> AuditEvent:
        c = granted.token.claims
        mandate_id, mandate_version = granted.mandate or (None, None)
        return AuditEvent(
            type=AuditEventType.TOKEN_ISSUED,
            issuer=self._settings.issuer,
            subject=c["sub"],
            client_id=c["client_id"],
            audience=c["aud"],
            scopes=tuple(c["scope"].split()),
            jti=c["jti"],
            transaction_id=c.get("txn"),
            partner=c.get("partner"),
            actor_chain=granted.actor_chain,
            authorization_details_digest=granted.details_digest,
            mandate_id=mandate_id,
            mandate_version=mandate_version,
            decision="allow",
            payload={"grant_type": grant_type, "exp": c["exp"], **_origin(c), **granted.audit},
        )

    def _refused(
        self,
        exc: OAuth2Error,
        form: Form,
        client: AuthenticatedClient | None,
        grant_type: str | None,
    ) -> AuditEvent:
        client_id = client.client.client_id if client else None
        return AuditEvent(
            type=AuditEventType.TOKEN_REFUSED,
            issuer=self._settings.issuer,
            subject=client_id,
            client_id=client_id,
            # What the caller asked for, unvalidated: bounded so junk cannot bloat the audit trail.
            audience=next(iter(form.get_all("resource") + form.get_all("audience")), "")[:512]
            or None,
            scopes=tuple(s[:128] for s in (form.get("scope") or "").split()[:32]),
            jti=client.assertion_jti if client else None,
            partner=exc.partner,
            decision="deny",
            reason=exc.error,
            reason_ids=(exc.reason_id,) if exc.reason_id else (),
            payload={"grant_type": (grant_type or "")[:64], "detail": exc.debug[:500]},
        )


def _count_binding_refusal(exc: OAuth2Error) -> None:
    """Refusals of the binding step, by reason (the DPoP check's slug, or the missing certificate)."""
    if exc.error in ("invalid_dpop_proof", "use_dpop_nonce"):
        metrics.TOKEN_BINDING_REFUSED.labels(reason=exc.debug or exc.error).inc()
    elif exc.reason_id == "sender_constraint_required":
        metrics.TOKEN_BINDING_REFUSED.labels(reason=exc.reason_id).inc()


@functools.lru_cache(maxsize=4096)
def _issued_counters(grant_type: str, client_id: str, binding: str) -> tuple[Counter, ...]:
    """The issuance counters' series for these labels, looked up once: in multiprocess mode a
    ``labels()`` lookup costs twice the increment itself."""
    return (
        metrics.TOKENS_ISSUED.labels(grant_type=grant_type),
        metrics.TOKENS_ISSUED_BY_CLIENT.labels(client_id=client_id),
        metrics.TOKENS_ISSUED_BY_BINDING.labels(binding=binding),
    )


def _client_conditions(client: AuthenticatedClient) -> tuple[Condition, ...]:
    """The client assertion's jti, when the authenticator left it to consume with the outcome."""
    if client.pending_use is None:
        return ()
    return (ConsumeJti(client.pending_use, replayed),)


def _origin(claims: dict[str, Any]) -> dict[str, Any]:
    """A federated subject's origin (partner issuer and subject), kept in the issue record."""
    origin = claims.get("origin")
    return {"origin": origin} if origin is not None else {}
