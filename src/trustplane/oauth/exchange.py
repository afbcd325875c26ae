"""OAuth 2.0 Token Exchange (RFC 8693) at the token endpoint: delegation chains across issuers.

A client presents a ``subject_token`` (whose authority it wants to use) and, optionally, an
``actor_token`` (who acts); it gets a new RFC 9068 access token for one target audience that can only
narrow what the subject token carried. See docs/token_exchange.md for the rules in full.

Subject tokens:

- ``urn:ietf:params:oauth:token-type:access_token``: one of OUR access tokens (``typ: at+jwt``,
  ``iss`` = our issuer, signature by our keys, not expired, not revoked, its client active, its
  mandate usable now), or a trusted partner's access token (``typ: at+jwt``, verified by the partner
  registry with that partner's keys only);
- ``urn:ietf:params:oauth:token-type:jwt``: a partner assertion (``typ`` absent or ``JWT``); its
  ``jti`` is single-use, consumed with the outcome like a jwt-bearer assertion.

Anything else (``id_token``, ``refresh_token``, SAML, an ID token or client assertion or logout token
presented as an access token) is ``invalid_request``.

Who may exchange (RFC 8693 §2.1-2.2, §4.4, §5; ``oauth.exchange_rights``): one of OUR tokens only
its own client, a client named in its ``may_act``, or the operator-made resource server for its
``aud``; a partner's token only when addressed to this server or to such a resource server. Being
able to call a resource server never makes a client that resource server. Anyone else is
``invalid_request``, reason ``not_entitled``.

A subject token carrying one of our mandates is exchanged only where the PDP agrees that the
exchanging client is related to the mandate's grantee: the ``token:exchange`` request carries
``context.mandate`` (id, version, grantor, grantee legal entity, grantee client) and the
``exchange_right``; the default bundle forbids an exchange by a client that is neither the grantee
client nor a client of the grantee's legal entity (``exchange.mandate_grantee``).

Repeated exchange of one access token by an entitled client is not counted or capped: RFC 8693 lets
a legitimate actor exchange the token it holds for each downstream call, every derived token ends
no later than the subject token, each exchange is decided and recorded, and revoking the subject
token stops further exchanges of it. (A partner assertion, ``jwt``, stays single-use.)

The issued token: ``sub`` of the subject (partner subjects stay namespaced, with ``origin``),
``client_id`` of the exchanging client, ``act`` = the current actor with the subject token's ``act``
nested inside it, ``txn`` kept (or minted), ``mandate`` kept and re-checked (our own mandates only;
a partner's mandate reference travels in ``prv``), ``prv`` = ``{iss, jti}`` of the subject token
with the subject token's own ``prv`` nested (the provenance chain), ``exp`` never after the subject
token's.

Impersonation: a client that sends ``exchange_mode=impersonation`` (a trustplane extension parameter,
RFC 8693 §2.1 allows them) asks for a token WITHOUT ``act``: it then speaks as the subject. It is
issued only when the PDP permits it (``impersonation: true`` in the decision context; the default
bundle forbids it), never with an ``actor_token``, and never for a subject token that is itself
delegated (its ``act`` history would be dropped). The ledger records who impersonated whom.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from trustplane import metrics
from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.model import Client
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.clients.service import ClientRegistry
from trustplane.errors import (
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    OAuth2Error,
    UnauthorizedClientError,
)
from trustplane.federation.profile import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT
from trustplane.federation.registry import (
    KEY_HEADERS,
    PartnerRegistry,
    PartnerTokenError,
    VerifiedPartnerToken,
)
from trustplane.jose.jws import JWSError, parse
from trustplane.keys.service import KeyService
from trustplane.mandates.errors import MandateUnusableError
from trustplane.mandates.model import Mandate
from trustplane.mandates.service import MandateService
from trustplane.oauth.exchange_rights import own_token_right, partner_token_audience
from trustplane.oauth.token_endpoint import Grant
from trustplane.policy.enforcement import (
    CACHE_SIZE,
    ScopeDenied,
    cacheable,
    decision_of,
    fresh_record,
)
from trustplane.policy.engine import EXCHANGE_ACTION, PolicyEngine
from trustplane.policy.recorder import DecisionRecord
from trustplane.protocol.form import Form
from trustplane.protocol.replay import ReplayCache, ReplayUse
from trustplane.protocol.revocations import RevocationStore
from trustplane.protocol.scopes import Vocabulary
from trustplane.protocol.tokens import issue_access_token, new_jti, read_access_token
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage.db import Database

log = structlog.get_logger("trustplane.exchange")

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
#: Token types RFC 8693 §3 defines that we never accept as a subject or actor token.
KNOWN_REFUSED = frozenset(
    {
        "urn:ietf:params:oauth:token-type:id_token",
        "urn:ietf:params:oauth:token-type:refresh_token",
        "urn:ietf:params:oauth:token-type:saml1",
        "urn:ietf:params:oauth:token-type:saml2",
    }
)
#: ``exchange_mode`` values: delegation (the default, an ``act`` chain) or impersonation (no ``act``).
DELEGATION, IMPERSONATION = "delegation", "impersonation"
#: How many ``prv`` / ``act`` levels a token may carry (the PDP decides the allowed depth; this only
#: bounds the size of what we copy).
MAX_NESTING = 8


def _bad(description: str, reason_id: str, debug: str = "", partner: str | None = None) -> Any:
    return InvalidRequestError(description, debug=debug, reason_id=reason_id, partner=partner)


@dataclass(frozen=True, slots=True)
class Subject:
    """A verified subject token: whose authority, from which issuer, carrying what."""

    token_type: str
    issuer: str
    subject: str
    jti: str
    exp: int
    scopes: tuple[str, ...]
    claims: dict[str, Any]
    partner: VerifiedPartnerToken | None = None
    mandate: tuple[str, int] | None = None
    #: How the exchanging client may exchange this token: ``subject_client``, ``may_act``,
    #: ``resource_server`` or ``partner`` (see the module docstring).
    right: str = ""
    #: The mandate version behind the token (our own mandates), for the PDP's grantee relation.
    terms: Mandate | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    sub: str
    iss: str
    client_id: str | None = None

    def claim(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sub": self.sub, "iss": self.iss}
        if self.client_id is not None:
            out["client_id"] = self.client_id
        return out


@dataclass(slots=True)
class _Request:
    client: Client
    subject: Subject
    actor: Actor
    resource: str = ""
    scopes: tuple[str, ...] = ()
    details: tuple[dict[str, Any], ...] = ()
    chain: tuple[str, ...] = field(default_factory=tuple)
    txn: str = ""
    impersonation: bool = False


class TokenExchangeGrant:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        keys: KeyService,
        vocabulary: Vocabulary,
        clients: ClientRegistry,
        partners: PartnerRegistry,
        mandates: MandateService,
        details: AuthorizationDetailsRegistry,
        replay: ReplayCache,
        revocations: RevocationStore,
        engine: PolicyEngine | None,
    ) -> None:
        self._settings, self._db, self._keys = settings, db, keys
        self._vocabulary, self._clients, self._partners = vocabulary, clients, partners
        self._mandates, self._details, self._replay = mandates, details, replay
        self._revocations, self._engine = revocations, engine
        #: Decisions by everything the request is built from (see ``policy.enforcement``: Cedar is
        #: a pure function of its request; a bundle switch or a registration change misses).
        self._cache: dict[tuple[Any, ...], tuple[DecisionRecord, ...]] = {}

    async def __call__(self, form: Form, auth: AuthenticatedClient) -> Grant:
        client = auth.client
        if TOKEN_EXCHANGE not in client.grant_types:
            raise UnauthorizedClientError("this client may not use the token-exchange grant")
        token, token_type = form.get("subject_token"), form.get("subject_token_type")
        if not token or not token_type:
            raise InvalidRequestError("subject_token and subject_token_type are required")
        now = int(time.time())
        subject = await self._subject(token, token_type, client, now)
        partner_id = subject.partner.partner.partner_id if subject.partner else None
        try:
            impersonation = _impersonation(form, subject)
            req = _Request(client, subject, await self._actor(form, client, now))
            req.impersonation = impersonation
            self._check_may_act(req)
            req.resource = self._resource(form, req)
            req.scopes = self._scopes(form, req)
            granted = tuple(subject.claims.get("authorization_details") or ())
            req.details = self._details.narrow(form.get("authorization_details"), client, granted)
        except OAuth2Error as exc:
            exc.partner = exc.partner or partner_id
            raise
        act = None if req.impersonation else self._act(req)
        req.chain = _chain(act) if act is not None else ()
        txn = subject.claims.get("txn")
        req.txn = txn if isinstance(txn, str) else new_jti()
        lifetime = min(self._settings.access_token_lifetime, subject.exp - now)
        if lifetime <= 0:  # a partner token within the clock skew of its exp: nothing left to give
            raise _bad("the subject_token has expired", "expired", partner=partner_id)
        decisions = self._decide(req)
        pending = await self._consume(subject)
        issued = issue_access_token(
            self._keys.ring,
            issuer=self._settings.issuer,
            subject=subject.subject,
            client_id=client.client_id,
            audience=req.resource,
            scopes=req.scopes,
            lifetime=lifetime,
            extra=self._claims(req, act),
            not_after=subject.exp,
        )
        prv_mandate = issued.claims["prv"].get("mandate")  # a partner's mandate reference
        mode = IMPERSONATION if req.impersonation else DELEGATION
        metrics.TOKEN_EXCHANGES.labels(
            subject_token_type=_short(subject.token_type), mode=mode
        ).inc()
        return Grant(
            issued,
            pending,
            _replayed(subject) if subject.partner else None,
            response={"issued_token_type": TOKEN_TYPE_ACCESS_TOKEN},
            mandate=subject.mandate,
            details_digest=self._details.digest(req.details),
            decisions=decisions,
            actor_chain=req.chain,
            unrevoked=(subject.jti,) if subject.partner is None else (),
            revoked_error=_bad("the subject_token has been revoked", "revoked"),
            audit={
                "exchange": {
                    "subject_token": {"iss": subject.issuer, "jti": subject.jti},
                    "subject_token_type": subject.token_type,
                    "derived_token": {"iss": self._settings.issuer, "jti": issued.claims["jti"]},
                    "mode": mode,
                    **({"act": act} if act is not None else {"impersonated_by": client.client_id}),
                    **({"subject_mandate": prv_mandate} if prv_mandate else {}),
                }
            },
        )

    # ------------------------------------------------------------------ subject token

    async def _subject(self, token: str, token_type: str, client: Client, now: int) -> Subject:
        if token_type not in (TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT):
            known = token_type in KNOWN_REFUSED
            raise _bad(
                f"subject_token_type {token_type[:100]!r} is not accepted"
                + ("" if known else " (unknown token type)"),
                "token_type",
            )
        try:
            jws = parse(token)
            unverified = jws.claims()
        except JWSError as exc:
            raise _bad(
                "the subject_token is not a JWT we can read", "malformed", str(exc)
            ) from None
        named = [h for h in KEY_HEADERS if h in jws.header]
        if named:
            raise _bad(
                f"subject_token header parameter {named[0]} is not accepted", "key_in_header"
            )
        typ = jws.header.get("typ")
        is_access = isinstance(typ, str) and typ.lower() in ACCESS_TOKEN_TYPES
        if (token_type == TOKEN_TYPE_ACCESS_TOKEN) != is_access:
            raise _bad(
                "the subject_token is not of the declared subject_token_type",
                "token_type",
                f"typ={str(typ)[:40]!r} declared {token_type}",
            )
        aud = unverified.get("aud")
        issuer = unverified.get("iss")
        if issuer == self._settings.issuer:
            if not is_access:
                raise _bad("only our access tokens can be exchanged here", "token_type")
            return await self._own(token, aud, client, now)
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        target = self._settings.issuer if not is_access else aud
        expected, right = partner_token_audience(target, client, self._settings.issuer)
        accepted = frozenset({token_type})
        try:
            verified = await self._partners.verify_partner_jwt(
                token, expected_audience=expected, accepted_types=accepted, now=now
            )
        except PartnerTokenError as exc:
            metrics.PARTNER_ASSERTIONS.labels(
                partner=exc.partner or "unknown", outcome=exc.reason_id
            ).inc()
            raise _bad(exc.description, exc.reason_id, exc.debug, exc.partner) from None
        claims = dict(verified.claims)
        scope = claims.get("scope")
        scopes = tuple(scope.split()) if isinstance(scope, str) else ()
        if not is_access:  # an assertion names no scopes: what the partner profile allows
            scopes = tuple(sorted(verified.partner.allowed_scopes))
        return Subject(
            token_type, verified.issuer, verified.subject, verified.jti, verified.exp,
            scopes, claims, verified, right=right,
        )  # fmt: skip

    async def _own(self, token: str, aud: object, client: Client, now: int) -> Subject:
        claims = read_access_token(self._keys.ring, token, issuer=self._settings.issuer, now=0)
        if claims is None:
            raise _bad("the subject_token is not a valid access token of this server", "signature")
        if claims["exp"] <= now:
            raise _bad("the subject_token has expired", "expired")
        right = own_token_right(claims, aud, client, self._settings.issuer)
        owner = self._clients.get(str(claims.get("client_id")))
        if owner is None or not owner.active:
            raise _bad("the subject_token's client is no longer active", "client_inactive")
        # revocation is checked with the outcome, in the same transaction (Grant.unrevoked)
        terms = await self._mandate(claims.get("mandate"), now)
        return Subject(
            TOKEN_TYPE_ACCESS_TOKEN, self._settings.issuer, str(claims["sub"]),
            str(claims["jti"]), int(claims["exp"]), tuple(str(claims["scope"]).split()),
            dict(claims), None, (terms.id, terms.version) if terms else None, right, terms,
        )  # fmt: skip

    async def _mandate(self, ref: object, now: int) -> Mandate | None:
        if ref is None:
            return None
        if not isinstance(ref, dict):
            raise _bad("the subject_token's mandate reference is malformed", "mandate")
        mandate_id, version = ref.get("id"), ref.get("version")
        if not isinstance(mandate_id, str) or not isinstance(version, int):
            raise _bad("the subject_token's mandate reference is malformed", "mandate")
        try:
            return await self._mandates.check_usable(mandate_id, version, now)
        except MandateUnusableError as exc:
            raise _bad(
                "the mandate behind the subject_token is no longer usable",
                f"mandate_{exc.reason}",
                str(exc),
            ) from None

    # ------------------------------------------------------------------ actor

    async def _actor(self, form: Form, client: Client, now: int) -> Actor:
        """Without an actor token the exchanging client is the actor (RFC 8693 §1.1 delegation)."""
        token, token_type = form.get("actor_token"), form.get("actor_token_type")
        if token is None and token_type is None:
            return Actor(client.client_id, self._settings.issuer, client.client_id)
        if not token or not token_type:
            raise InvalidRequestError(
                "actor_token_type is required with actor_token (and only then)"
            )
        if token_type != TOKEN_TYPE_ACCESS_TOKEN:
            raise _bad("actor_token_type must be an access token of this server", "actor_type")
        claims = read_access_token(self._keys.ring, token, issuer=self._settings.issuer, now=now)
        if claims is None:
            raise _bad("the actor_token is not a valid access token of this server", "actor_token")
        if claims.get("client_id") != client.client_id:
            raise _bad(
                "the actor_token must have been issued to the exchanging client", "actor_client"
            )
        async with self._db.read() as conn:
            if await self._revocations.is_revoked(conn, str(claims["jti"])):
                raise _bad("the actor_token has been revoked", "actor_revoked")
        return Actor(str(claims["sub"]), self._settings.issuer, client.client_id)

    def _check_may_act(self, req: _Request) -> None:
        """RFC 8693 §4.4: ``may_act`` names who may act for the subject; anyone else is refused."""
        may_act = req.subject.claims.get("may_act")
        if may_act is None:
            return
        actor = req.actor
        allowed = isinstance(may_act, dict) and may_act.get("sub") == actor.sub
        if allowed and isinstance(may_act, dict) and "iss" in may_act:
            allowed = may_act["iss"] == actor.iss
        if not allowed:
            raise _bad(
                "the actor is not named in the subject_token's may_act",
                "may_act",
                f"actor {actor.sub[:100]} ({actor.iss[:100]})",
            )

    # ------------------------------------------------------------------ target

    def _resource(self, form: Form, req: _Request) -> str:
        targets = list(dict.fromkeys(form.get_all("resource") + form.get_all("audience")))
        resource = select_resource(targets, req.client, self._vocabulary)
        partner = req.subject.partner
        if partner is not None and resource not in partner.partner.allowed_audiences:
            raise InvalidTargetError("resource is not allowed for this partner", debug=resource)
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
        partner = req.subject.partner
        if partner is not None:
            outside = [s for s in scopes if s not in partner.partner.allowed_scopes]
            if outside:
                raise InvalidScopeError(f"scope {outside[0]!r} is not allowed for this partner")
        return scopes

    # ------------------------------------------------------------------ policy, claims

    def _act(self, req: _Request) -> dict[str, Any]:
        act = req.actor.claim()
        previous = req.subject.claims.get("act")
        if isinstance(previous, dict):
            act["act"] = _bounded(previous)
        return act

    def _decide(self, req: _Request) -> tuple[DecisionRecord, ...]:
        """One ``token:exchange`` decision per scope; a deny is ``invalid_scope`` with the records."""
        if self._engine is None:
            return ()
        client = req.client
        legal_entity = Entity("LegalEntity", client.lei)
        principal = Entity(
            "Client",
            client.client_id,
            {"legal_entity": legal_entity, "scopes": frozenset(client.scopes)},
            (legal_entity,),
        )
        context = exchange_context(req)
        requests = [  # built lazily would save little: Entity construction is cheap next to Cedar
            DecisionRequest(
                principal,
                EXCHANGE_ACTION,
                Entity("Scope", scope, {"name": scope, "audience": req.resource}),
                context,
                None,
            )
            for scope in req.scopes
        ]
        key = (self._engine.version, client.client_id, client.updated_at, client.lei,
               client.scopes, req.scopes, req.resource, req.subject.subject, req.subject.issuer,
               req.subject.token_type, req.actor.sub, req.actor.iss, req.chain,
               req.impersonation, req.subject.right, req.subject.mandate)  # fmt: skip
        cached = self._cache.get(key)
        if cached is not None:
            metrics.POLICY_CACHE.labels(result="hit").inc()
            found = [fresh_record(r) for r in cached]
        else:
            metrics.POLICY_CACHE.labels(result="miss").inc()
            found = [r for _, r in self._engine.evaluate(requests)]
            if cacheable(found, key[0]):
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
                self._cache[key] = tuple(found)
        # the decisions belong to the transaction: the ledger's per-transaction view lists them
        records = tuple(replace(r, event=replace(r.event, transaction_id=req.txn)) for r in found)
        denied = [decision_of(r) for r in records if r.event.decision != "allow"]
        if denied:
            log.info(
                "token_exchange_denied",
                client_id=client.client_id,
                audience=req.resource,
                depth=len(req.chain),
                impersonation=req.impersonation,
                reason_ids=sorted({i for d in denied for i in d.reason_ids}),
            )
            refusal = ScopeDenied(records, denied)
            if req.impersonation:
                refusal.description = "impersonation is not permitted by policy for this exchange"
            raise refusal
        return records

    def _claims(self, req: _Request, act: dict[str, Any] | None) -> dict[str, Any]:
        subject, claims = req.subject, req.subject.claims
        provenance: dict[str, Any] = {"iss": subject.issuer, "jti": subject.jti}
        previous = claims.get("prv")
        if isinstance(previous, dict):
            provenance["prv"] = _bounded(previous)
        extra: dict[str, Any] = {"prv": provenance}
        if act is not None:
            extra["act"] = act
        if subject.partner is not None:
            extra.update(subject.partner.issued_claims())
            if isinstance(claims.get("origin"), dict):  # a partner token that kept its own origin
                extra["origin"] = _bounded(claims["origin"])
            if isinstance(claims.get("mandate"), dict):
                provenance["mandate"] = _bounded(claims["mandate"])
        else:
            for name in ("lei", "origin", "partner", "tctx"):
                if name in claims:
                    extra[name] = claims[name]
            if subject.mandate is not None:
                extra["mandate"] = {"id": subject.mandate[0], "version": subject.mandate[1]}
        extra["txn"] = req.txn
        if req.details:
            extra["authorization_details"] = list(req.details)
        return extra

    async def _consume(self, subject: Subject) -> ReplayUse | None:
        """A partner assertion (``jwt``) is single-use; an access token is not (RFC 6750 bearer)."""
        if subject.partner is None or subject.token_type != TOKEN_TYPE_JWT:
            return None
        use = subject.partner.replay_use(self._settings.clock_skew)
        if self._replay.deferrable:
            return use
        if not await self._replay.consume(use.issuer, use.jti, use.expires_at):
            raise _replayed(subject)
        return None


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
            "id": terms.id,
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
        raise _bad(
            "an actor_token asks for delegation; impersonation has no actor", "impersonation_actor"
        )
    if "act" in subject.claims:
        raise _bad(
            "a delegated subject_token (one with act) cannot be impersonated: its actor chain "
            "would be lost",
            "impersonation_of_delegated",
        )
    return True


def _replayed(subject: Subject) -> InvalidRequestError:
    partner = subject.partner.partner.partner_id if subject.partner else None
    return InvalidRequestError(
        "the subject_token was already used",
        debug=f"partner assertion jti replay: {subject.jti[:64]}",
        reason_id="replay",
        partner=partner,
    )


def _chain(act: dict[str, Any]) -> tuple[str, ...]:
    """``act`` as a list of actor subjects, current actor first."""
    out: list[str] = []
    node: Any = act
    while isinstance(node, dict) and len(out) < MAX_NESTING + 1:
        out.append(str(node.get("sub"))[:256])
        node = node.get("act")
    return tuple(out)


def _bounded(value: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """A nested ``act``/``prv`` copied with at most :data:`MAX_NESTING` levels."""
    out = {k: v for k, v in value.items() if k not in ("act", "prv")}
    for key in ("act", "prv"):
        inner = value.get(key)
        if isinstance(inner, dict) and depth < MAX_NESTING:
            out[key] = _bounded(inner, depth + 1)
    return out


def _short(token_type: str) -> str:
    return token_type.rsplit(":", 1)[-1]
