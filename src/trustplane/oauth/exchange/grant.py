"""The token-exchange grant (RFC 8693 §2): verify the subject and actor, choose the target and the
scopes (only ever narrower), ask the one ``TokenPolicy`` (``token:exchange``), issue. See the package
docstring for the rules and docs/token_exchange.md for the whole picture."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from prometheus_client import Counter

from trustplane import metrics
from trustplane.authzen.model import Entity
from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.model import Client
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.errors import (
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    OAuth2Error,
)
from trustplane.federation.partner_assertions import (
    PartnerAssertions,
    check_audience,
    check_scopes,
    replayed,
)
from trustplane.federation.profile import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT
from trustplane.federation.token_binding import require_binding
from trustplane.grant.contract import Granted, TokenIssuer
from trustplane.grant.outcomes import Condition, NotRevoked
from trustplane.ids import new_jti
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.oauth.exchange.actor import Actor, ActorTokens, check_may_act
from trustplane.oauth.exchange.claims import act_claim, chain, token_claims
from trustplane.oauth.exchange.subject import Subject, SubjectTokens, revoked, unacceptable
from trustplane.oauth.exchange.txn_token import TOKEN_TYPE_TXN_TOKEN, TxnTokenService
from trustplane.policy.enforcement import ScopeDenied, TokenPolicy
from trustplane.policy.recorder import DecisionRecord
from trustplane.protocol.form import Form
from trustplane.protocol.scopes import Vocabulary
from trustplane.rar.registry import AuthorizationDetailsRegistry

log = structlog.get_logger("trustplane.exchange")

#: ``exchange_mode`` values: delegation (the default, an ``act`` chain) or impersonation (no ``act``).
DELEGATION, IMPERSONATION = "delegation", "impersonation"


@dataclass(slots=True)
class _Request:
    client: Client
    subject: Subject
    actor: Actor
    resource: str = ""
    scopes: tuple[str, ...] = ()
    details: tuple[dict[str, Any], ...] = ()
    chain: tuple[str, ...] = ()
    txn: str = ""
    impersonation: bool = False


class TokenExchangeGrant:
    grant_type: ClassVar[str] = TOKEN_EXCHANGE
    label: ClassVar[str] = "token-exchange"

    def __init__(
        self,
        *,
        tokens: TokenIssuer,
        policy: TokenPolicy,
        vocabulary: Vocabulary,
        details: AuthorizationDetailsRegistry,
        subjects: SubjectTokens,
        actors: ActorTokens,
        partners: PartnerAssertions,
        txn_tokens: TxnTokenService | None = None,
    ) -> None:
        self._tokens, self._policy, self._vocabulary = tokens, policy, vocabulary
        self._details, self._subjects, self._actors = details, subjects, actors
        self._partners, self._txn_tokens = partners, txn_tokens

    async def handle(self, form: Form, auth: AuthenticatedClient) -> Granted:
        client = auth.client
        requested = form.get("requested_token_type")
        if requested == TOKEN_TYPE_TXN_TOKEN:
            if self._txn_tokens is None:
                raise InvalidRequestError("this server does not issue transaction tokens")
            return await self._txn_tokens.handle(form, client)  # oauth.exchange.txn_token
        if requested and requested != TOKEN_TYPE_ACCESS_TOKEN:
            # RFC 8693 §2.1: we issue access tokens (and Txn-Tokens); never another type than asked
            raise InvalidRequestError(
                f"requested_token_type {requested} is not supported: "
                f"use {TOKEN_TYPE_ACCESS_TOKEN} or {TOKEN_TYPE_TXN_TOKEN}"
            )
        token, token_type = form.get("subject_token"), form.get("subject_token_type")
        if not token or not token_type:
            raise InvalidRequestError("subject_token and subject_token_type are required")
        now = int(time.time())
        subject = await self._subjects.verify(token, token_type, client, now)
        try:
            if subject.partner is not None:  # the profile's token_binding, before the jti is used
                require_binding(subject.partner.partner)
            req = await self._request(form, client, subject, now)
        except OAuth2Error as exc:
            exc.partner = exc.partner or subject.partner_id
            raise
        act = None if req.impersonation else act_claim(req.actor, subject)
        req.chain = chain(act) if act is not None else ()
        txn = subject.claims.get("txn")
        req.txn = txn if isinstance(txn, str) else new_jti()
        if subject.exp <= now:  # a partner token within the clock skew of its exp: nothing to give
            raise unacceptable(
                "the subject_token has expired", "expired", partner=subject.partner_id
            )
        decisions = self._decide(req)
        conditions = await self._conditions(subject)
        issued = self._tokens.issue(
            subject=subject.subject,
            client_id=client.client_id,
            audience=req.resource,
            scopes=req.scopes,
            extra=token_claims(subject, act, req.txn, req.details),
            not_after=subject.exp,
        )
        _exchanges(subject.token_type, req.impersonation).inc()
        metrics.EXCHANGE_CHAIN_DEPTH.observe(len(req.chain))
        response: dict[str, Any] = {"issued_token_type": TOKEN_TYPE_ACCESS_TOKEN}
        if req.details:  # RFC 9396 §7: the response says what the token carries
            response["authorization_details"] = list(req.details)
        return Granted(
            token=issued,
            response=response,
            mandate=subject.mandate,
            details_digest=self._details.digest(req.details),
            decisions=decisions,
            conditions=conditions,
            actor_chain=req.chain,
            audit=self._audit(req, act, issued.claims),
        )

    async def _request(self, form: Form, client: Client, subject: Subject, now: int) -> _Request:
        """Actor, target, scopes and details, each checked against the subject token."""
        impersonation = _impersonation(form, subject)
        req = _Request(client, subject, await self._actors.actor(form, client, now))
        req.impersonation = impersonation
        check_may_act(subject, req.actor)
        req.resource = self._resource(form, req)
        req.scopes = self._scopes(form, req)
        # RFC 9396 §6: only our own tokens grant details; a partner's profile grants none
        own = subject.partner is None
        granted = tuple(subject.claims.get("authorization_details") or ()) if own else ()
        req.details = self._details.narrow(form.get("authorization_details"), client, granted)
        return req

    def _resource(self, form: Form, req: _Request) -> str:
        targets = list(dict.fromkeys(form.get_all("resource") + form.get_all("audience")))
        resource = select_resource(targets, req.client, self._vocabulary)
        if req.subject.partner is not None:
            check_audience(req.subject.partner, resource)
        if not any(self._vocabulary.accepts(resource, s) for s in req.subject.scopes):
            raise InvalidTargetError(
                "resource accepts none of the subject_token's scopes", debug=resource
            )
        return resource

    def _scopes(self, form: Form, req: _Request) -> tuple[str, ...]:
        held = req.subject.scopes
        requested = form.get("scope")
        if requested is None:
            usable = [
                s
                for s in held
                if self._vocabulary.accepts(req.resource, s) and s in req.client.scopes
            ]
            requested = " ".join(usable)
        else:
            wider = [s for s in requested.split() if s not in held]
            if wider:
                raise InvalidScopeError(
                    f"scope {wider[0]!r} is not in the subject_token: an exchange only narrows"[
                        :200
                    ]
                )
        scopes = select_scopes(requested, req.client, req.resource, self._vocabulary)
        if req.subject.partner is not None:
            check_scopes(req.subject.partner, scopes)
        return scopes

    def _decide(self, req: _Request) -> tuple[DecisionRecord, ...]:
        """One ``token:exchange`` decision per scope; a deny is ``invalid_scope`` with the records."""
        subject, actor = req.subject, req.actor
        inputs = (subject.subject, subject.issuer, subject.token_type, actor.sub, actor.iss,
                  req.chain, req.impersonation, subject.right, subject.mandate)  # fmt: skip
        try:
            return self._policy.check_exchange(
                req.client,
                req.scopes,
                req.resource,
                exchange_context(req),
                inputs,
                transaction_id=req.txn,
            )
        except ScopeDenied as refusal:
            log.info(
                "token_exchange_denied",
                client_id=req.client.client_id,
                audience=req.resource,
                depth=len(req.chain),
                impersonation=req.impersonation,
                reason_ids=sorted({i for d in refusal.denied for i in d.reason_ids}),
            )
            if req.impersonation:
                refusal.description = "impersonation is not permitted by policy for this exchange"
            raise

    async def _conditions(self, subject: Subject) -> tuple[Condition, ...]:
        """Our own subject token must not be revoked; a partner assertion (``jwt``) is single-use
        (an access token is not: RFC 6750 bearer)."""
        if subject.partner is None:
            return (NotRevoked(subject.jti, revoked),)
        if subject.token_type != TOKEN_TYPE_JWT:
            return ()
        error = replayed(subject.partner, InvalidRequestError, "the subject_token was already used")
        return await self._partners.single_use(subject.partner, error)

    def _audit(
        self, req: _Request, act: dict[str, Any] | None, claims: dict[str, Any]
    ) -> dict[str, Any]:
        subject = req.subject
        prv_mandate = claims["prv"].get("mandate")  # a partner's mandate reference
        return {
            "exchange": {
                "subject_token": {"iss": subject.issuer, "jti": subject.jti},
                "subject_token_type": subject.token_type,
                "derived_token": {"iss": self._tokens.issuer, "jti": claims["jti"]},
                "mode": IMPERSONATION if req.impersonation else DELEGATION,
                **({"act": act} if act is not None else {"impersonated_by": req.client.client_id}),
                **({"subject_mandate": prv_mandate} if prv_mandate else {}),
            }
        }


def exchange_context(req: _Request) -> dict[str, Any]:
    """The ``token:exchange`` decision context (``ExchangeContext`` in the default schema).

    ``exchange_right`` says how the exchanging client (the principal) may exchange the subject
    token; ``mandate``, present when the subject token rests on one of our mandates, names its
    grantor and grantee (legal entities) and the grantee client, so that policy decides whether the
    exchanging client is related to the grantee (docs/policy.md)."""
    subject = req.subject
    context: dict[str, Any] = {
        "audience": req.resource,
        "requested_scopes": list(req.scopes),
        "delegation_depth": len(req.chain),
        "impersonation": req.impersonation,
        "subject": subject.subject,
        "subject_issuer": subject.issuer,
        "subject_token_type": subject.token_type,
        "actor": req.actor.sub,
        "actor_issuer": req.actor.iss,
        "actor_chain": list(req.chain),
        "exchange_right": subject.right,
    }
    terms = subject.terms
    if terms is not None:
        context["mandate"] = {
            "id": terms.mandate_id,
            "version": terms.version,
            "grantor": Entity("LegalEntity", terms.grantor_lei),
            "grantee": Entity("LegalEntity", terms.grantee_lei),
            "grantee_client": Entity("Client", terms.grantee_client_id),
        }
    return context


def _impersonation(form: Form, subject: Subject) -> bool:
    """``exchange_mode``: ``delegation`` (default) or ``impersonation``, which takes no actor token
    and no subject token that already carries an ``act`` chain (impersonating it would erase who
    acted before: the origin must be preserved, not flattened)."""
    mode = form.get("exchange_mode") or DELEGATION
    if mode not in (DELEGATION, IMPERSONATION):
        raise InvalidRequestError(
            f"exchange_mode {mode[:40]!r} is not supported: use delegation or impersonation"
        )
    if mode == DELEGATION:
        return False
    if form.get("actor_token") is not None:
        raise unacceptable(
            "an actor_token asks for delegation; impersonation has no actor", "impersonation_actor"
        )
    if "act" in subject.claims:
        raise unacceptable(
            "a delegated subject_token (one with act) cannot be impersonated: its actor chain "
            "would be lost",
            "impersonation_of_delegated",
        )
    return True


@functools.lru_cache(maxsize=16)
def _exchanges(token_type: str, impersonation: bool) -> Counter:
    """The exchange counter's series for these labels, looked up once (a ``labels()`` lookup costs
    more than the increment; two token types by two modes)."""
    mode = IMPERSONATION if impersonation else DELEGATION
    return metrics.TOKEN_EXCHANGES.labels(
        subject_token_type=token_type.rsplit(":", 1)[-1], mode=mode
    )
