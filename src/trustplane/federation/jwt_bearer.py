"""The JWT-bearer authorization grant (RFC 7523 §2.1) for assertions signed by a trusted partner.

The requesting client authenticates as usual (private_key_jwt); ``assertion`` is a partner-issued
JWT about a subject, verified by :meth:`PartnerRegistry.verify_partner_jwt` (issuer, that partner's
keys only, algorithm, ``aud`` = our issuer, ``exp`` within the profile's lifetime, required claims).
Its ``jti`` is single-use: consumed in the same group-commit transaction as the token outcome (or at
once in Redis), under a namespace of its own so it can never collide with a client-assertion jti.

Errors (RFC 7523 §3.1): a bad assertion is ``invalid_grant``; a scope or audience outside the
profile, the client or the vocabulary is ``invalid_scope`` / ``invalid_target``.

The issued RFC 9068 token keeps the origin: ``sub`` = ``partner:<partner_id>:<sub>``, ``origin`` =
``{iss, sub}`` as the partner asserted them, ``partner``, ``lei`` of the partner, the mapped local
attributes, and ``txn``/``tctx`` when the assertion carries them.
"""

from __future__ import annotations

from trustplane import metrics
from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.errors import (
    InvalidGrantError,
    InvalidScopeError,
    InvalidTargetError,
    OAuth2Error,
    UnauthorizedClientError,
)
from trustplane.federation.profile import TOKEN_TYPE_JWT
from trustplane.federation.registry import PartnerRegistry, PartnerTokenError, VerifiedPartnerToken
from trustplane.keys.service import KeyService
from trustplane.oauth.token_endpoint import Grant, ScopeCheck
from trustplane.protocol.form import Form
from trustplane.protocol.replay import ReplayCache, ReplayUse
from trustplane.protocol.scopes import Vocabulary
from trustplane.protocol.tokens import issue_access_token
from trustplane.settings import Settings

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCEPTED = frozenset({TOKEN_TYPE_JWT})


def assertion_replayed(verified: VerifiedPartnerToken) -> InvalidGrantError:
    """RFC 7523 §3 item 7: the partner assertion's jti was used before."""
    return InvalidGrantError(
        "the assertion was already used",
        debug=f"partner assertion jti replay: {verified.jti[:64]}",
        reason_id="replay",
        partner=verified.partner.partner_id,
    )


class JwtBearerGrant:
    def __init__(
        self,
        settings: Settings,
        registry: PartnerRegistry,
        keys: KeyService,
        vocabulary: Vocabulary,
        replay: ReplayCache,
        *,
        authorize: ScopeCheck | None = None,
    ) -> None:
        self._settings, self._registry, self._keys = settings, registry, keys
        self._authorize = authorize
        self._vocabulary, self._replay = vocabulary, replay

    async def __call__(self, form: Form, auth: AuthenticatedClient) -> Grant:
        client = auth.client
        if JWT_BEARER not in client.grant_types:
            raise UnauthorizedClientError("this client may not use the jwt-bearer grant")
        verified = await self._verify(form.require("assertion"))
        try:
            resource, scopes = self._target(form, auth, verified)
        except OAuth2Error as exc:
            exc.partner = verified.partner.partner_id  # the audit record names the partner
            raise
        decisions = self._authorize(client, scopes, resource, JWT_BEARER) if self._authorize else ()
        pending = await self._consume(verified)
        token = issue_access_token(
            self._keys.ring,
            issuer=self._settings.issuer,
            subject=verified.subject,
            client_id=client.client_id,
            audience=resource,
            scopes=scopes,
            lifetime=self._settings.access_token_lifetime,
            extra=verified.issued_claims(),
        )
        metrics.PARTNER_ASSERTIONS.labels(
            partner=verified.partner.partner_id, outcome="accepted"
        ).inc()
        return Grant(token, pending, assertion_replayed(verified), decisions=decisions)

    def _target(
        self, form: Form, auth: AuthenticatedClient, verified: VerifiedPartnerToken
    ) -> tuple[str, tuple[str, ...]]:
        """The audience and scopes: allowed for the client, the vocabulary AND the partner."""
        partner = verified.partner
        resource = select_resource(form.get_all("resource"), auth.client, self._vocabulary)
        if resource not in partner.allowed_audiences:
            raise InvalidTargetError("resource is not allowed for this partner", debug=resource)
        scopes = select_scopes(form.get("scope"), auth.client, resource, self._vocabulary)
        outside = [s for s in scopes if s not in partner.allowed_scopes]
        if outside:
            raise InvalidScopeError(f"scope {outside[0]!r} is not allowed for this partner"[:200])
        return resource, scopes

    async def _verify(self, assertion: str) -> VerifiedPartnerToken:
        try:
            return await self._registry.verify_partner_jwt(
                assertion, expected_audience=self._settings.issuer, accepted_types=ACCEPTED
            )
        except PartnerTokenError as exc:
            label = exc.partner or "unknown"
            metrics.PARTNER_ASSERTIONS.labels(partner=label, outcome=exc.reason_id).inc()
            raise InvalidGrantError(
                exc.description, debug=exc.debug, reason_id=exc.reason_id, partner=exc.partner
            ) from None

    async def _consume(self, verified: VerifiedPartnerToken) -> ReplayUse | None:
        """The use to commit with the outcome, or (Redis) consume it now."""
        use = verified.replay_use(self._settings.clock_skew)
        if self._replay.deferrable:
            return use
        if not await self._replay.consume(use.issuer, use.jti, use.expires_at):
            raise assertion_replayed(verified)
        return None
