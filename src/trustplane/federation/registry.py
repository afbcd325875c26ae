"""The in-memory partner registry the hot path reads, and verification of partner-signed JWTs.

:meth:`PartnerRegistry.verify_partner_jwt` is the one place a partner's JWT is trusted, for the
jwt-bearer grant (RFC 7523 §2.1, §3) and for token exchange (RFC 8693 ``subject_token``). In order:

1. The header names no key and no URL: ``jku``, ``x5u``, ``jwk``, ``x5c`` refuse the token before any
   lookup, so a token can never make us fetch anything or trust a key it brought along.
2. ``iss`` names a partner in the registry (byte-equal); the partner is active.
3. ``alg`` is in that partner's allow-list; ``typ`` gives the token type, which must be accepted by
   the caller and by the profile.
4. The signature verifies with a key of THAT partner only (inline JWKS, or its allow-listed
   ``jwks_uri``, refetched on an unknown ``kid`` at most once per interval).
5. ``aud`` is exactly the expected audience; ``exp`` is required, not past, and within the profile's
   maximum lifetime (also measured from ``iat``); ``iat``/``nbf`` not in the future beyond the skew;
   ``sub`` and ``jti`` are printable strings; every required claim is present.
6. Claim mappings give the local attributes; ``product``/``region`` must be allowed by the profile;
   required transaction attributes must be in ``tctx`` and come with a ``txn``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, NewType, TypeGuard

from cryptography.hazmat.primitives.asymmetric import rsa

from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.errors import wire_description
from trustplane.federation.profile import (
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT,
    TrustProfile,
    jwks_uri_problem,
)
from trustplane.jose.jwk import PublicKey
from trustplane.jose.jws import JWSError, ParsedJWS, parse
from trustplane.protocol.replay import ReplayUse
from trustplane.settings import Settings

#: Header parameters that name a key or where to get one (RFC 7515 §4.1.2-4.1.6). Never honoured.
KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
#: ``typ`` media subtype (see :func:`token_type_of`) -> RFC 8693 token type. Anything else
#: (id_token, logout+jwt, ...) is refused.
TYP_TOKEN_TYPES: dict[str | None, str] = {
    None: TOKEN_TYPE_JWT,
    "jwt": TOKEN_TYPE_JWT,
    "at+jwt": TOKEN_TYPE_ACCESS_TOKEN,
}
#: Replay-cache namespace: partner jtis can never collide with client-assertion jtis (client ids).
REPLAY_NAMESPACE = "partner-assertion:"
SUBJECT_PREFIX = "partner:"
MAX_STRING = 256
MAX_ATTRIBUTE_ITEMS = 32

#: Claims of a partner JWT whose signature, issuer, audience, lifetime and shape have been checked.
PartnerClaims = NewType("PartnerClaims", dict[str, Any])


class PartnerTokenError(Exception):
    """A partner JWT is refused. ``reason_id`` is stable (metrics, audit ``reason_ids``);
    ``description`` is safe to send to the caller (what the token carried shows within RFC 6749
    §5.2's character set); ``debug`` is for logs and the audit trail."""

    def __init__(
        self, reason_id: str, description: str, *, debug: str = "", partner: str | None = None
    ) -> None:
        shown = wire_description(description)[:300]
        super().__init__(shown)
        self.reason_id, self.description = reason_id, shown
        self.debug, self.partner = debug or description, partner


def token_type_of(typ: object) -> str | None:
    """The RFC 8693 token type a JWS ``typ`` header names, None if none we know. RFC 7515 §4.1.9:
    ``typ`` is a media type, compared case-insensitively, and a value without ``/`` stands for
    ``application/<value>``: ``JWT``, ``jwt`` and ``application/jwt`` are one type."""
    if typ is None:
        return TYP_TOKEN_TYPES[None]
    if not isinstance(typ, str):
        return None
    subtype = typ.lower()
    if "/" in subtype:
        kind, _, subtype = subtype.partition("/")
        if kind != "application":
            return None
    return TYP_TOKEN_TYPES.get(subtype)


def namespaced_subject(partner_id: str, subject: str) -> str:
    """The local name of a partner's subject: ``partner:<partner_id>:<sub>``.

    ``partner_id`` has no ``:`` (schema pattern), so the split is unambiguous, and no local subject
    starts with ``partner:`` (client ids start with ``tp-``), so a partner subject can never collide
    with a local one, nor with another partner's subject of the same ``sub``."""
    return f"{SUBJECT_PREFIX}{partner_id}:{subject}"


def origin_of(subject: str) -> tuple[str, str] | None:
    """``(partner_id, sub)`` of a namespaced subject; None for a local subject."""
    if not subject.startswith(SUBJECT_PREFIX):
        return None
    partner_id, sep, sub = subject[len(SUBJECT_PREFIX) :].partition(":")
    return (partner_id, sub) if sep and partner_id else None


@dataclass(frozen=True, slots=True)
class VerifiedPartnerToken:
    """What a verified partner JWT says, ready to put into a token we issue."""

    partner: TrustProfile
    token_type: str
    claims: PartnerClaims
    issuer: str
    origin_subject: str
    jti: str
    exp: int
    attributes: dict[str, Any] = field(default_factory=dict)
    transaction_id: str | None = None
    transaction_context: dict[str, Any] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return namespaced_subject(self.partner.partner_id, self.origin_subject)

    @property
    def origin(self) -> dict[str, str]:
        """The ``origin`` claim of issued tokens: who asserted the subject, unflattened."""
        return {"iss": self.issuer, "sub": self.origin_subject}

    def replay_use(self, skew: int) -> ReplayUse:
        """The single use of this token's ``jti`` (RFC 7523 §3 item 7), remembered past its ``exp``."""
        return ReplayUse(REPLAY_NAMESPACE + self.issuer, self.jti, self.exp + skew)

    def issued_claims(self) -> dict[str, Any]:
        """The claims an RFC 9068 token issued for this subject carries besides the standard ones;
        ``lei`` is the partner's: the subject belongs to the partner's legal entity."""
        extra: dict[str, Any] = {
            "origin": self.origin,
            "partner": self.partner.partner_id,
            "lei": self.partner.lei,
            **self.attributes,
        }
        if self.transaction_id is not None:
            extra["txn"] = self.transaction_id
        if self.transaction_context:
            extra["tctx"] = self.transaction_context
        return extra


class PartnerRegistry:
    """Trust profiles by partner id and by issuer; swapped whole on reload (``generation`` counts)."""

    def __init__(self, settings: Settings, remote_jwks: RemoteJwksCache) -> None:
        self._settings, self.remote_jwks = settings, remote_jwks
        self._by_id: dict[str, TrustProfile] = {}
        self._by_issuer: dict[str, TrustProfile] = {}
        self._remote_ok: dict[str, bool] = {}
        self.generation = 0
        #: set at every reload (the SSF subscriber waits on it instead of polling ``generation``);
        #: a waiter clears it before it looks at the profiles
        self.reloaded = asyncio.Event()

    def replace_all(self, profiles: list[TrustProfile]) -> None:
        self._by_id = {p.partner_id: p for p in profiles}
        self._by_issuer = {issuer: p for p in profiles for issuer in p.issuers}
        self._remote_ok = {
            p.partner_id: jwks_uri_problem(p.jwks_uri, self._settings) is None
            for p in profiles
            if p.jwks_uri
        }
        self.generation += 1
        self.reloaded.set()

    def get(self, partner_id: str) -> TrustProfile | None:
        return self._by_id.get(partner_id)

    def profiles(self) -> list[TrustProfile]:
        """Every partner's current profile (the snapshot of the last load)."""
        return list(self._by_id.values())

    def partner_for_issuer(self, issuer: str) -> TrustProfile | None:
        """The partner owning this ``iss`` (byte-equal), whatever its status; None if untrusted."""
        return self._by_issuer.get(issuer)

    def __len__(self) -> int:
        return len(self._by_id)

    async def aclose(self) -> None:
        await self.remote_jwks.aclose()

    async def verify_partner_jwt(
        self,
        token: str,
        *,
        expected_audience: str,
        accepted_types: frozenset[str] | set[str],
        now: int | None = None,
    ) -> VerifiedPartnerToken:
        """Verify a partner-signed JWT (see the module docstring) or raise :class:`PartnerTokenError`."""
        try:
            jws = parse(token)
        except JWSError as exc:
            reason = "algorithm" if "algorithm" in str(exc) else "malformed"
            raise PartnerTokenError(
                reason, f"the assertion is not an acceptable JWS: {exc}"[:200]
            ) from None
        named = [h for h in KEY_HEADERS if h in jws.header]
        if named:
            raise PartnerTokenError(
                "key_in_header",
                f"header parameter {named[0]} is not accepted: keys come from the trust profile",
            )
        try:
            claims = jws.claims()
        except JWSError as exc:
            raise PartnerTokenError("malformed", "the assertion payload is not JSON") from exc
        partner = self._partner(claims.get("iss"))
        token_type = self._check_header(jws, partner, accepted_types)
        await self._check_signature(jws, partner)
        current = int(time.time()) if now is None else now
        exp = self._check_times(claims, partner, expected_audience, current)
        return self._verified(claims, partner, token_type, exp)

    async def verify_signed(self, token: str) -> tuple[TrustProfile, dict[str, Any], str | None]:
        """A JWS signed by an active partner's key (any ``typ``: the caller checks it): the partner,
        the claims and the ``typ`` header. Used for Security Event Tokens (trustplane.ssf); keys
        come only from the trust profile, as for assertions. Raises :class:`PartnerTokenError`."""
        try:
            jws = parse(token)
            claims = jws.claims()
        except JWSError as exc:
            raise PartnerTokenError("malformed", f"not an acceptable JWS: {exc}"[:200]) from None
        named = [h for h in KEY_HEADERS if h in jws.header]
        if named:
            raise PartnerTokenError("key_in_header", f"header parameter {named[0]} is refused")
        partner = self._partner(claims.get("iss"))
        if jws.alg not in partner.algorithms:
            raise PartnerTokenError(
                "algorithm", f"algorithm {jws.alg} is not allowed", partner=partner.partner_id
            )
        await self._check_signature(jws, partner)
        typ = jws.header.get("typ")
        return partner, claims, typ if isinstance(typ, str) else None

    def _partner(self, issuer: object) -> TrustProfile:
        partner = self.partner_for_issuer(issuer) if isinstance(issuer, str) else None
        if partner is None:
            shown = str(issuer)[:200]
            raise PartnerTokenError(
                "untrusted_issuer", "the assertion issuer is not a trusted partner", debug=shown
            )
        if not partner.active:
            raise PartnerTokenError(
                "partner_disabled", "the partner is disabled", partner=partner.partner_id
            )
        return partner

    def _check_header(
        self, jws: ParsedJWS, partner: TrustProfile, accepted: frozenset[str] | set[str]
    ) -> str:
        pid = partner.partner_id
        if jws.alg not in partner.algorithms:
            raise PartnerTokenError(
                "algorithm", f"algorithm {jws.alg} is not allowed for this partner", partner=pid
            )
        typ = jws.header.get("typ")
        token_type = token_type_of(typ)
        if token_type is None or token_type not in accepted:
            raise PartnerTokenError(
                "token_type", f"a token with typ {typ!r} is not accepted here", partner=pid
            )
        if token_type not in partner.accepted_token_types:
            raise PartnerTokenError(
                "token_type", f"the trust profile does not accept {token_type}", partner=pid
            )
        return token_type

    async def _check_signature(self, jws: ParsedJWS, partner: TrustProfile) -> None:
        kid = jws.header.get("kid")
        kid = kid if isinstance(kid, str) else None
        for key in await self._keys(partner, kid, jws.alg):
            if jws.verify(key):
                return
        raise PartnerTokenError(
            "signature",
            "the assertion signature does not verify with a key of the issuing partner",
            debug=f"{partner.partner_id}: kid={kid!r} alg={jws.alg}",
            partner=partner.partner_id,
        )

    async def _keys(self, partner: TrustProfile, kid: str | None, alg: str) -> list[PublicKey]:
        keys = partner.keys
        if partner.jwks_uri is not None:
            if not self._remote_ok.get(partner.partner_id, False):
                return []  # the allow-list changed since the profile was stored
            keys = tuple(await self.remote_jwks.keys(partner.jwks_uri, kid))
        return [
            key
            for k, key_alg, key in keys
            if key_alg == alg
            and (kid is None or k == kid)
            and (not isinstance(key, rsa.RSAPublicKey) or key.key_size >= partner.min_rsa_bits)
        ]

    def _check_times(
        self, claims: dict[str, Any], partner: TrustProfile, audience: str, now: int
    ) -> int:
        pid, skew, cap = (
            partner.partner_id,
            self._settings.clock_skew,
            partner.max_assertion_lifetime,
        )
        aud = claims.get("aud")
        if aud != audience and aud != [audience]:
            raise PartnerTokenError(
                "audience", "the assertion aud must be exactly this server's issuer",
                debug=f"aud={str(aud)[:200]}", partner=pid,
            )  # fmt: skip
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        if not _is_time(exp):
            raise PartnerTokenError("missing_claim", "the assertion exp is required", partner=pid)
        if exp <= now - skew:
            raise PartnerTokenError("expired", "the assertion has expired", partner=pid)
        for name, value in (("iat", iat), ("nbf", nbf)):
            if value is not None and not _is_time(value):
                raise PartnerTokenError(
                    "claim_value", f"the assertion {name} must be a NumericDate", partner=pid
                )
            if value is not None and value > now + skew:
                raise PartnerTokenError(
                    "not_yet_valid", f"the assertion {name} is in the future", partner=pid
                )
        issued = iat if _is_time(iat) else now
        if exp - issued > cap or exp > now + cap + skew:
            raise PartnerTokenError(
                "lifetime",
                f"the assertion lifetime exceeds this partner's maximum of {cap} s",
                debug=f"exp={exp} iat={iat} now={now}",
                partner=pid,
            )
        return int(exp)

    def _verified(
        self, claims: dict[str, Any], partner: TrustProfile, token_type: str, exp: int
    ) -> VerifiedPartnerToken:
        pid = partner.partner_id
        for name in ("sub", "jti"):
            if not _short_string(claims.get(name)):
                raise PartnerTokenError(
                    "missing_claim",
                    f"the assertion {name} is required: a printable string of at most {MAX_STRING}"
                    " characters",
                    partner=pid,
                )
        missing = [name for name in partner.required_claims if claims.get(name) is None]
        if missing:
            raise PartnerTokenError(
                "missing_claim",
                f"the assertion lacks required claim(s): {', '.join(missing)}"[:300],
                partner=pid,
            )
        attributes = self._attributes(claims, partner)
        txn, tctx = self._transaction(claims, partner)
        return VerifiedPartnerToken(
            partner=partner,
            token_type=token_type,
            claims=PartnerClaims(claims),
            issuer=claims["iss"],
            origin_subject=claims["sub"],
            jti=claims["jti"],
            exp=exp,
            attributes=attributes,
            transaction_id=txn,
            transaction_context=tctx,
        )

    def _attributes(self, claims: dict[str, Any], partner: TrustProfile) -> dict[str, Any]:
        pid, out = partner.partner_id, {}
        for claim, attribute in partner.claim_mappings.items():
            value = claims.get(claim)
            if value is None:
                continue
            if not _attribute_value(value):
                raise PartnerTokenError(
                    "claim_value",
                    f"claim {claim!r} must be a short string, number, boolean or list of strings"[
                        :300
                    ],
                    partner=pid,
                )
            out[attribute] = value
        for name, allowed in (
            ("product", partner.allowed_products),
            ("region", partner.allowed_regions),
        ):
            values = out.get(name)
            values = values if isinstance(values, list) else [values] if values is not None else []
            refused = [v for v in values if allowed and v not in allowed]
            if refused:
                raise PartnerTokenError(
                    f"{name}_not_allowed",
                    f"{name} {str(refused[0])[:64]!r} is not allowed for this partner",
                    partner=pid,
                )
        return out

    def _transaction(
        self, claims: dict[str, Any], partner: TrustProfile
    ) -> tuple[str | None, dict[str, Any]]:
        txn, tctx = claims.get("txn"), claims.get("tctx")
        pid, required = partner.partner_id, partner.required_transaction_attributes
        if txn is not None and not _short_string(txn):
            raise PartnerTokenError(
                "claim_value", "txn must be a short printable string", partner=pid
            )
        if not required:
            return txn, {}
        if txn is None or not isinstance(tctx, dict):
            raise PartnerTokenError(
                "transaction", "this partner's assertions must carry txn and tctx", partner=pid
            )
        missing = [name for name in required if tctx.get(name) is None]
        if missing:
            raise PartnerTokenError(
                "transaction",
                f"tctx lacks required transaction attribute(s): {', '.join(missing)}",
                partner=pid,
            )
        context = {name: tctx[name] for name in required}
        if not all(_attribute_value(v) for v in context.values()):
            raise PartnerTokenError("claim_value", "tctx values must be short scalars", partner=pid)
        return txn, context


def _is_time(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short_string(value: object) -> TypeGuard[str]:
    # printable only: a NUL cannot be stored in PostgreSQL and would fail the replay batch
    return isinstance(value, str) and 0 < len(value) <= MAX_STRING and value.isprintable()


def _attribute_value(value: object) -> bool:
    if isinstance(value, bool | int | float):
        return True
    if isinstance(value, list):
        return len(value) <= MAX_ATTRIBUTE_ITEMS and all(_short_string(v) for v in value)
    return _short_string(value)
