"""The policy enforcement point, framework-free: authenticate the bearer token, then ask the PDP.

Every refusal is a typed error carrying its RFC 6750 ``WWW-Authenticate`` challenge:

======================================  ======  ==========================  ==========================
situation                               status  ``error``                   why
======================================  ======  ==========================  ==========================
no Authorization header                 401     (none, bare challenge)      RFC 6750 §3.1
token in the query string or body       400     ``invalid_request``         §2.2/§2.3 refused
malformed or repeated header            400     ``invalid_request``         §3.1
bad, expired, foreign, revoked token    401     ``invalid_token``           §3.1
scope missing, or the policy denies     403     ``insufficient_scope``      §3.1
chain of authority not as required      403     ``insufficient_scope``      §3.1 (valid, not enough)
issuer keys / introspection / PDP down  503     ``temporarily_unavailable`` fail closed, retryable
======================================  ======  ==========================  ==========================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from trustplane.authzen.model import Decision, DecisionPoint, Entity, FailReason
from trustplane.errors import (
    InsufficientScopeError,
    InvalidRequestError,
    OAuth2Error,
    TemporarilyUnavailableError,
)
from trustplane.pep import metrics
from trustplane.pep.bearer import QUERY_OR_FORM_TOKEN, presented_token, with_challenge
from trustplane.pep.dpop import DpopBinding, DpopRequest, refuse_unverifiable
from trustplane.pep.introspection import IntrospectionUnavailable
from trustplane.pep.keys import KeySourceError
from trustplane.pep.provenance import ChainRequirement
from trustplane.pep.validator import AccessToken, TokenValidator

log = structlog.get_logger("trustplane.pep")
SubjectMapper = Callable[[AccessToken], Entity]


def client_subject(token: AccessToken) -> Entity:
    """The default PDP subject of a token: the client, member of its legal entity (``lei``)."""
    lei = token.claims.get("lei")
    parents = (Entity("LegalEntity", lei),) if isinstance(lei, str) and lei else ()
    attributes: dict[str, Any] = {"scopes": sorted(token.scopes)}
    if parents:
        attributes["legal_entity"] = parents[0]
    return Entity("Client", token.client_id, attributes, parents)


def transaction_of(token: AccessToken) -> str | None:
    txn = token.claims.get("txn")
    return txn if isinstance(txn, str) and 0 < len(txn) <= 256 else None


class PolicyEnforcer:
    """``realm`` names the protected API in challenges; ``subject`` maps a token to the PDP subject;
    ``chain``: the chain of authority (``act``, ``prv``, ``origin``, mandate, ``txn``) a delegated
    token must show before the PDP is asked (see :mod:`trustplane.pep.provenance`); ``dpop``: accept
    DPoP-bound tokens and verify their proofs (:mod:`trustplane.pep.dpop`)."""

    def __init__(
        self,
        validator: TokenValidator,
        pdp: DecisionPoint,
        *,
        realm: str,
        subject: SubjectMapper = client_subject,
        chain: ChainRequirement | None = None,
        dpop: DpopBinding | None = None,
    ) -> None:
        self.validator, self.pdp, self.realm, self._subject = validator, pdp, realm, subject
        self.chain, self.dpop = chain, dpop

    async def authenticate(
        self,
        authorization: str | None,
        *,
        header_count: int = 1,
        token_elsewhere: bool = False,
        dpop: DpopRequest | None = None,
    ) -> AccessToken:
        """The validated token of a request. ``token_elsewhere``: the request also carries an
        ``access_token`` in its query string or form body, which is refused outright. ``dpop``: the
        request's method, URI and ``DPoP`` headers, for a DPoP-bound token's proof."""
        scheme = None
        try:
            if token_elsewhere:
                raise InvalidRequestError(QUERY_OR_FORM_TOKEN, debug="token_elsewhere")
            scheme, raw = presented_token(authorization, header_count, dpop=self.dpop is not None)
            token = await self.validator.validate(raw)
            if self.dpop is None:
                refuse_unverifiable(token)
            else:
                await self.dpop.check(scheme, token, dpop, self.realm)
            return token
        except (KeySourceError, IntrospectionUnavailable) as exc:
            log.error("pep_issuer_unavailable", error=str(exc))
            raise self._refuse(TemporarilyUnavailableError("try again shortly"), "issuer") from None
        except OAuth2Error as exc:
            if self.dpop is not None:
                self.dpop.challenged(exc, self.realm, scheme)
            raise self._refuse(exc, exc.debug) from None

    async def authorize(
        self,
        token: AccessToken,
        action: str,
        resource: Entity,
        context: Mapping[str, Any],
        *,
        scope: str | None = None,
        correlation_id: str | None = None,
    ) -> Decision:
        """Ask the PDP; return the allow decision or raise the refusal. ``scope`` (if given) must
        be in the token first: a token without it never reaches the PDP. The token's ``txn`` (if
        any) goes with the question, so the PDP records the decision in that transaction."""
        if scope is not None and scope not in token.scopes:
            error = InsufficientScopeError(f"the token lacks scope {scope}")
            raise self._forbidden(
                token, error, "scope", scope, client_id=token.client_id, action=action
            )
        problem = self.chain.problem(token.claims) if self.chain is not None else None
        if problem is not None:
            error = InsufficientScopeError(
                f"the token's chain of authority is not accepted: {problem}"
            )
            raise self._forbidden(
                token, error, "provenance", scope, client_id=token.client_id, action=action
            )
        decision = await self.pdp.decide(
            self._subject(token),
            action,
            resource,
            context,
            correlation_id=correlation_id,
            transaction_id=transaction_of(token),
        )
        if decision.allowed:
            metrics.PEP_ALLOWED.inc()
            return decision
        facts: dict[str, Any] = {
            "client_id": token.client_id,
            "action": action,
            "resource": resource.uid,
            "decision_id": decision.decision_id,
            "reason_ids": decision.reason_ids,
            "correlation_id": correlation_id,
        }
        if FailReason.PDP_UNREACHABLE.value in decision.reason_ids:
            unavailable = TemporarilyUnavailableError("try again shortly")
            raise self._refuse(unavailable, "pdp_unreachable", **facts)
        description = f"denied by policy (decision {decision.decision_id})"
        reason = decision.reason_ids[0] if decision.reason_ids else "deny"
        raise self._forbidden(
            token, InsufficientScopeError(description), reason, scope or action, **facts
        )

    def _forbidden(
        self,
        token: AccessToken,
        exc: OAuth2Error,
        reason: str,
        scope: str | None = None,
        **facts: Any,
    ) -> OAuth2Error:
        """A refusal of an accepted token: its challenge uses the scheme the request used (a
        DPoP-bound token came with the ``DPoP`` scheme, RFC 9449 §7.1)."""
        if self.dpop is not None:
            self.dpop.refused_for(token, exc, self.realm, scope)
        return self._refuse(exc, reason, scope, **facts)

    def _refuse(
        self, exc: OAuth2Error, reason: str, scope: str | None = None, **facts: Any
    ) -> OAuth2Error:
        """Count, log (one line per refusal: what was refused and why) and add the challenge."""
        metrics.PEP_REFUSED.labels(error=exc.error, reason=reason[:64]).inc()
        log.info("pep_refused", realm=self.realm, error=exc.error, reason=reason, **facts)
        if isinstance(exc, TemporarilyUnavailableError):
            exc.headers = {**exc.headers, "Retry-After": "1"}
            return exc
        return with_challenge(exc, self.realm, scope)

    async def aclose(self) -> None:
        await self.validator.aclose()
