"""The JWT-bearer authorization grant (RFC 7523 §2.1) for assertions signed by a trusted partner.

The requesting client authenticates as usual (private_key_jwt); ``assertion`` is a partner-issued
JWT about a subject, verified by :meth:`PartnerRegistry.verify_partner_jwt` (issuer, that partner's
keys only, algorithm, ``aud`` = our issuer, ``exp`` within the profile's lifetime, required claims).
Its ``jti`` is single-use: consumed in the same group-commit transaction as the token outcome (or at
once in Redis), under a namespace of its own so it can never collide with a client-assertion jti
(``federation.partner_assertions``, shared with token exchange).

Errors (RFC 7523 §3.1): a bad assertion is ``invalid_grant``; a scope or audience outside the
profile, the client or the vocabulary is ``invalid_scope`` / ``invalid_target``. RFC 9396 §6: the
underlying grant decides which ``authorization_details`` a token may carry, and a partner
assertion grants none, so the parameter is ``invalid_authorization_details``, never dropped. Each
refusal comes before the assertion's ``jti`` is used, including the profile's ``token_binding``
(``federation.token_binding``: without the DPoP proof or certificate it requires, no token).

The issued RFC 9068 token keeps the origin: ``sub`` = ``partner:<partner_id>:<sub>``, ``origin`` =
``{iss, sub}`` as the partner asserted them, ``partner``, ``lei`` of the partner, the mapped local
attributes, and ``txn``/``tctx`` when the assertion carries them.
"""

from __future__ import annotations

from typing import ClassVar

from trustplane import metrics
from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.errors import InvalidAuthorizationDetailsError, InvalidGrantError, OAuth2Error
from trustplane.federation.partner_assertions import (
    PartnerAssertions,
    check_audience,
    check_scopes,
    replayed,
)
from trustplane.federation.profile import TOKEN_TYPE_JWT
from trustplane.federation.registry import VerifiedPartnerToken
from trustplane.federation.token_binding import require_binding
from trustplane.grant.contract import Granted, TokenIssuer
from trustplane.policy.enforcement import TokenPolicy
from trustplane.protocol.form import Form
from trustplane.protocol.scopes import Vocabulary

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCEPTED = frozenset({TOKEN_TYPE_JWT})


class JwtBearerGrant:
    grant_type: ClassVar[str] = JWT_BEARER
    label: ClassVar[str] = "jwt-bearer"

    def __init__(
        self,
        *,
        tokens: TokenIssuer,
        policy: TokenPolicy,
        vocabulary: Vocabulary,
        partners: PartnerAssertions,
    ) -> None:
        self._tokens, self._policy = tokens, policy
        self._vocabulary, self._partners = vocabulary, partners

    async def handle(self, form: Form, auth: AuthenticatedClient) -> Granted:
        client = auth.client
        verified = await self._partners.verify(
            form.require("assertion"),
            audience=self._tokens.issuer,
            accepted_types=ACCEPTED,
            refusal=InvalidGrantError,
        )
        try:
            require_binding(verified.partner)  # the profile's token_binding, before the jti is used
            resource, scopes = self._target(form, auth, verified)
        except OAuth2Error as exc:
            exc.partner = verified.partner.partner_id  # the audit record names the partner
            raise
        decisions = self._policy.check(client, scopes, resource, JWT_BEARER)
        conditions = await self._partners.single_use(
            verified, replayed(verified, InvalidGrantError, "the assertion was already used")
        )
        token = self._tokens.issue(
            subject=verified.subject,
            client_id=client.client_id,
            audience=resource,
            scopes=scopes,
            extra=verified.issued_claims(),
        )
        metrics.PARTNER_ASSERTIONS.labels(
            partner=verified.partner.partner_id, outcome="accepted"
        ).inc()
        return Granted(token=token, decisions=decisions, conditions=conditions)

    def _target(
        self, form: Form, auth: AuthenticatedClient, verified: VerifiedPartnerToken
    ) -> tuple[str, tuple[str, ...]]:
        """The audience and scopes: allowed for the client, the vocabulary AND the partner."""
        if "authorization_details" in form:
            raise InvalidAuthorizationDetailsError(
                "the jwt-bearer grant carries no authorization_details: a partner assertion "
                "grants none (RFC 9396 section 6)"
            )
        resource = select_resource(form.get_all("resource"), auth.client, self._vocabulary)
        check_audience(verified, resource)
        scopes = select_scopes(form.get("scope"), auth.client, resource, self._vocabulary)
        check_scopes(verified, scopes)
        return resource, scopes
