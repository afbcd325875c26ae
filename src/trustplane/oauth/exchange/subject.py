"""The ``subject_token`` of a token exchange (RFC 8693 §2.1): whose authority, verified.

``urn:ietf:params:oauth:token-type:access_token``: one of OUR access tokens (``typ: at+jwt``,
``iss`` = our issuer, signed by our keys, not expired, its client active, its mandate usable now;
revocation is checked with the outcome, in the same transaction; the signature check of a token
presented again is remembered: ``oauth.exchange.verified``), or a trusted partner's access
token (``typ: at+jwt``, verified with that partner's keys only). ``urn:...:jwt``: a partner
assertion (``typ`` absent or ``JWT``), whose ``jti`` is single-use. Anything else is
``invalid_request`` (§2.2.2), as is a token whose ``typ`` contradicts the declared type or whose
header names a key (``jwk``, ``jku``, ``x5c``, ``x5u``: never looked at).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustplane.clients.model import Client
from trustplane.clients.service import ClientRegistry
from trustplane.errors import InvalidRequestError
from trustplane.federation.partner_assertions import PartnerAssertions
from trustplane.federation.profile import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT
from trustplane.federation.registry import KEY_HEADERS, VerifiedPartnerToken
from trustplane.jose.jws import JWSError, parse
from trustplane.keys.service import KeyService
from trustplane.mandates.errors import MandateUnusableError
from trustplane.mandates.service import MandateService
from trustplane.mandates.store import Version
from trustplane.oauth.exchange.rights import own_token_right, partner_token_audience
from trustplane.oauth.exchange.verified import VerifiedOwnTokens
from trustplane.protocol.tokens import VerifiedClaims

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


def unacceptable(
    description: str, reason_id: str, debug: str = "", partner: str | None = None
) -> InvalidRequestError:
    """RFC 8693 §2.2.2: a subject or actor token that is invalid or unacceptable."""
    return InvalidRequestError(description, debug=debug, reason_id=reason_id, partner=partner)


def revoked() -> InvalidRequestError:
    """The refusal of a revoked subject token, built only when the outcome's transaction finds it
    revoked (the ``refusal`` of a :class:`~trustplane.grant.outcomes.NotRevoked`)."""
    return unacceptable("the subject_token has been revoked", "revoked")


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
    #: ``resource_server`` or ``partner`` (``oauth.exchange.rights``).
    right: str = ""
    #: The mandate version's terms behind the token (our own mandates), for the PDP's grantee
    #: relation.
    terms: Version | None = None

    @property
    def partner_id(self) -> str | None:
        return self.partner.partner.partner_id if self.partner else None


class SubjectTokens:
    def __init__(
        self,
        *,
        issuer: str,
        keys: KeyService,
        clients: ClientRegistry,
        mandates: MandateService,
        partners: PartnerAssertions,
    ) -> None:
        self._issuer, self._keys, self._clients = issuer, keys, clients
        self._mandates, self._partners = mandates, partners
        self.verified = VerifiedOwnTokens(lambda: keys.ring, issuer)

    async def verify(self, token: str, token_type: str, client: Client, now: int) -> Subject:
        if token_type not in (TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT):
            known = token_type in KNOWN_REFUSED
            raise unacceptable(
                f"subject_token_type {token_type[:100]!r} is not accepted"
                + ("" if known else " (unknown token type)"),
                "token_type",
            )
        if token_type == TOKEN_TYPE_ACCESS_TOKEN:
            # presented before and verified then: its header and claims were read and checked
            # (ours: typ at+jwt, our iss, no key in the header), so it is not read again
            seen = self.verified.known(token, now)
            if seen is not None:
                return await self._own(seen, seen.get("aud"), client, now)
        try:
            jws = parse(token)
            unverified = jws.claims()
        except JWSError as exc:
            raise unacceptable(
                "the subject_token is not a JWT we can read", "malformed", str(exc)
            ) from None
        named = [h for h in KEY_HEADERS if h in jws.header]
        if named:
            raise unacceptable(
                f"subject_token header parameter {named[0]} is not accepted", "key_in_header"
            )
        typ = jws.header.get("typ")
        is_access = isinstance(typ, str) and typ.lower() in ACCESS_TOKEN_TYPES
        if (token_type == TOKEN_TYPE_ACCESS_TOKEN) != is_access:
            raise unacceptable(
                "the subject_token is not of the declared subject_token_type",
                "token_type",
                f"typ={str(typ)[:40]!r} declared {token_type}",
            )
        aud = unverified.get("aud")
        if unverified.get("iss") == self._issuer:
            if not is_access:
                raise unacceptable("only our access tokens can be exchanged here", "token_type")
            # parsed once: the cache verifies the signature over the same split and decode
            claims = self.verified.verify(token, jws, unverified, now)
            if claims is None:
                raise unacceptable(
                    "the subject_token is not a valid access token of this server", "signature"
                )
            return await self._own(claims, aud, client, now)
        return await self._partner(token, token_type, is_access, aud, client, now)

    async def _partner(
        self, token: str, token_type: str, is_access: bool, aud: object, client: Client, now: int
    ) -> Subject:
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        target = self._issuer if not is_access else aud
        expected, right = partner_token_audience(target, client, self._issuer)
        verified = await self._partners.verify(
            token,
            audience=expected,
            accepted_types=frozenset({token_type}),
            refusal=InvalidRequestError,
            now=now,
        )
        claims = dict(verified.claims)
        scope = claims.get("scope")
        scopes = tuple(scope.split()) if isinstance(scope, str) else ()
        if not is_access:  # an assertion names no scopes: what the partner profile allows
            scopes = tuple(sorted(verified.partner.allowed_scopes))
        return Subject(
            token_type, verified.issuer, verified.subject, verified.jti, verified.exp,
            scopes, claims, verified, right=right,
        )  # fmt: skip

    async def _own(self, claims: VerifiedClaims, aud: object, client: Client, now: int) -> Subject:
        """Everything but the signature, checked at every exchange: expiry, the client's right,
        the token's client still active, its mandate usable now."""
        if claims["exp"] <= now:
            raise unacceptable("the subject_token has expired", "expired")
        right = own_token_right(claims, aud, client, self._issuer)
        owner = self._clients.get(str(claims.get("client_id")))
        if owner is None or not owner.active:
            raise unacceptable("the subject_token's client is no longer active", "client_inactive")
        # revocation is checked with the outcome, in the same transaction (a NotRevoked condition)
        terms = await self._mandate(claims.get("mandate"), now)
        return Subject(
            TOKEN_TYPE_ACCESS_TOKEN, self._issuer, str(claims["sub"]),
            str(claims["jti"]), int(claims["exp"]), tuple(str(claims["scope"]).split()),
            dict(claims), None, (terms.mandate_id, terms.version) if terms else None, right, terms,
        )  # fmt: skip

    async def _mandate(self, ref: object, now: int) -> Version | None:
        if ref is None:
            return None
        if not isinstance(ref, dict):
            raise unacceptable("the subject_token's mandate reference is malformed", "mandate")
        mandate_id, version = ref.get("id"), ref.get("version")
        if not isinstance(mandate_id, str) or not isinstance(version, int):
            raise unacceptable("the subject_token's mandate reference is malformed", "mandate")
        try:
            return await self._mandates.usable_terms(mandate_id, version, now)
        except MandateUnusableError as exc:
            raise unacceptable(
                "the mandate behind the subject_token is no longer usable",
                f"mandate_{exc.reason}",
                str(exc),
            ) from None
