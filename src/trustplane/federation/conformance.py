"""The partner conformance checker: before a partner goes live (and in its CI), fetch its RFC 8414 /
OpenID metadata and JWKS and check them, and optionally a sample assertion, against its trust profile.

Every check is reported (name, pass/fail, why). Documents are fetched through the guarded outbound
fetcher (:mod:`trustplane.outbound`: https, public addresses, no redirects, timeouts, a size cap while
reading); plain http and loopback only with the explicit ``allow_insecure_loopback`` flag (tests and
sandboxes on this machine). The sample token's header is never used to find a key: it is checked
against the published JWKS.

Every ``*_alg_values_supported`` member of the metadata is checked on its own (RFC 8414 §2: ``none``
MUST NOT appear in ``token_endpoint_auth_signing_alg_values_supported``; we refuse it everywhere): a
finding names the member. Signing members may list only algorithms the profile allows; encryption
members (``*_encryption_alg_values_supported``) are key-management algorithms, checked for ``none``.
"""

from __future__ import annotations

import base64
import binascii
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from trustplane.federation.profile import ALWAYS_REQUIRED, TokenBinding, TrustProfile
from trustplane.federation.registry import KEY_HEADERS, token_type_of
from trustplane.jose.jwk import PRIVATE_MEMBERS, JWKError, PublicKey, import_public_jwk, thumbprint
from trustplane.jose.jws import JWSError, parse
from trustplane.outbound import OutboundError, OutboundFetcher, host_problem
from trustplane.settings import is_loopback_host

MAX_DOCUMENT = 256 * 1024
#: Metadata members naming algorithms end with this (RFC 8414 §2, OIDC Discovery, JARM, RFC 9449).
ALG_SUFFIX = "_alg_values_supported"
ENCRYPTION_ALG_SUFFIX = "_encryption_alg_values_supported"
CURVES = {"EC": "P-256", "OKP": "Ed25519"}


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


_BINDING_DETAIL = {
    TokenBinding.SENDER_CONSTRAINED: "sender_constrained: tokens on this partner's assertions need "
    "a DPoP proof (RFC 9449) or a client certificate (RFC 8705)",
    TokenBinding.DPOP: "dpop: tokens on this partner's assertions need a DPoP proof (RFC 9449)",
    TokenBinding.MTLS: "mtls: tokens on this partner's assertions need a client certificate "
    "(RFC 8705)",
    TokenBinding.BEARER: "bearer: the profile's exception, tokens on this partner's assertions may "
    "be bearer tokens",
}


class FetchError(Exception):
    """A document could not be fetched or is not a JSON object; the message says why."""


class ConformanceChecker:
    def __init__(
        self,
        profile: TrustProfile,
        *,
        audience: str,
        fetcher: OutboundFetcher,
        allow_insecure_loopback: bool = False,
    ) -> None:
        self._profile, self._audience, self._fetcher = profile, audience, fetcher
        self._insecure = allow_insecure_loopback

    async def run(self, metadata_url: str, sample_token: str | None = None) -> list[Check]:
        checks: list[Check] = []
        try:
            metadata = await self._fetch(metadata_url)
        except FetchError as exc:
            return [Check("metadata: fetched", False, str(exc))]
        checks.append(Check("metadata: fetched", True, metadata_url))
        checks += self._metadata_checks(metadata_url, metadata)
        jwks_uri = metadata.get("jwks_uri")
        jwks: dict[str, Any] | None = None
        if isinstance(jwks_uri, str):
            try:
                jwks = await self._fetch(jwks_uri)
                checks.append(Check("jwks: fetched", True, jwks_uri))
            except FetchError as exc:
                checks.append(Check("jwks: fetched", False, str(exc)))
        if jwks is not None:
            checks += list(self._jwks_checks(jwks))
        if sample_token is not None:
            checks += self._sample_checks(sample_token, jwks or {"keys": []})
        checks.append(self._binding_report())
        return checks

    def _binding_report(self) -> Check:
        """What the partner's clients must present with its assertions (``token_binding``): a
        report line, not a finding (``bearer`` is an exception the operator wrote down)."""
        binding = self._profile.token_binding
        return Check("profile: token binding", True, _BINDING_DETAIL[binding])

    async def _fetch(self, url: str) -> dict[str, Any]:
        try:
            return await self._fetcher.get_json(url, purpose="conformance", max_bytes=MAX_DOCUMENT)
        except OutboundError as exc:
            raise FetchError(f"{url}: {exc}") from None

    def _url_problem(self, url: str) -> str | None:
        try:
            parts = urlsplit(url)
        except ValueError:
            return "not a valid URL"
        insecure_ok = self._insecure and is_loopback_host(parts.hostname)
        if parts.scheme != "https" and not (parts.scheme == "http" and insecure_ok):
            return "must use https"
        return host_problem(parts.hostname or "", allow_loopback=self._insecure)

    # ------------------------------------------------------------------ metadata

    def _metadata_checks(self, url: str, metadata: dict[str, Any]) -> list[Check]:
        issuer = metadata.get("issuer")
        issuers = self._profile.issuers
        equal = isinstance(issuer, str) and issuer in issuers
        checks = [
            Check(
                "metadata: issuer equals the profile's (byte for byte)",
                equal,
                f"metadata issuer {issuer!r}; profile issuers {list(issuers)}",
            )
        ]
        if equal:
            assert isinstance(issuer, str)
            expected = well_known_urls(issuer)
            checks.append(
                Check(
                    "metadata: served from the issuer's well-known location",
                    url in expected,
                    f"{url}" + ("" if url in expected else f" is not one of {expected}"),
                )
            )
        checks.append(self._jwks_uri_check(metadata.get("jwks_uri")))
        checks += self._algorithm_checks(metadata)
        return checks

    def _jwks_uri_check(self, jwks_uri: object) -> Check:
        name = "metadata: jwks_uri"
        if not isinstance(jwks_uri, str):
            return Check(name, False, "no jwks_uri in the metadata")
        problem = self._url_problem(jwks_uri)
        if problem:
            return Check(name, False, f"{jwks_uri}: {problem}")
        expected = self._profile.jwks_uri
        if expected is not None and jwks_uri != expected:
            return Check(name, False, f"{jwks_uri} differs from the profile's {expected}")
        return Check(name, True, jwks_uri)

    def _algorithm_checks(self, metadata: dict[str, Any]) -> list[Check]:
        members = sorted(m for m in metadata if m.endswith(ALG_SUFFIX))
        checks = [self._alg_member_check(m, metadata[m]) for m in members]
        signing = {
            str(v)
            for m in members
            if not m.endswith(ENCRYPTION_ALG_SUFFIX) and isinstance(metadata[m], list)
            for v in metadata[m]
        }
        usable = sorted(signing & self._profile.algorithms)
        checks.append(
            Check(
                "metadata: advertises an algorithm the profile allows",
                bool(usable),
                f"usable {usable}" if signing else f"no *{ALG_SUFFIX} member in the metadata",
            )
        )
        return checks

    def _alg_member_check(self, member: str, values: object) -> Check:
        """One ``*_alg_values_supported`` member: a non-empty array of strings, no ``none``, and for
        a signing member nothing outside the profile's algorithms (a partner advertising what we
        refuse is one configuration change away from sending it)."""
        name = f"metadata: {member}"
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) for v in values)
        ):
            return Check(name, False, "must be a non-empty array of algorithm names")
        if "none" in values:
            return Check(name, False, "advertises 'none' (unsigned); RFC 8414 §2 forbids it")
        if member.endswith(ENCRYPTION_ALG_SUFFIX):
            return Check(name, True, f"{values} (key management; checked for 'none' only)")
        refused = sorted(set(values) - self._profile.algorithms)
        if refused:
            return Check(
                name,
                False,
                f"advertises {refused}, outside the profile's algorithms "
                f"{sorted(self._profile.algorithms)}",
            )
        return Check(name, True, ", ".join(values))

    # ------------------------------------------------------------------ keys

    def _jwks_checks(self, jwks: dict[str, Any]) -> Iterator[Check]:
        keys = jwks.get("keys")
        if not isinstance(keys, list) or not keys:
            yield Check("jwks: has keys", False, "no 'keys' array, or it is empty")
            return
        kids = [k.get("kid") if isinstance(k, dict) else None for k in keys]
        duplicates = sorted({str(k) for k in kids if k is not None and kids.count(k) > 1})
        missing = sum(1 for k in kids if not isinstance(k, str))
        yield Check(
            "jwks: kid values present and unique",
            not duplicates and not (missing and len(keys) > 1),
            f"duplicate kids {duplicates}" if duplicates else f"{missing} key(s) without kid"
            if missing and len(keys) > 1 else f"{len(keys)} key(s)",
        )  # fmt: skip
        for i, key in enumerate(keys):
            yield from self._key_checks(i, key)
        yield from self._profile_keys_published(keys)

    def _key_checks(self, index: int, key: Any) -> Iterator[Check]:
        if not isinstance(key, dict):
            yield Check(f"jwks key #{index}: is a JSON object", False, repr(key)[:80])
            return
        label = f"jwks key {key.get('kid', f'#{index}')}"
        private = sorted(PRIVATE_MEMBERS & key.keys())
        yield Check(
            f"{label}: no private or symmetric members",
            not private,
            f"carries {private}" if private else "public members only",
        )
        if key.get("use") == "enc":
            yield Check(f"{label}: use", True, "encryption key, not used for assertions")
            return
        yield self._type_and_size(label, key)
        yield self._use_and_alg(label, key)

    def _type_and_size(self, label: str, key: dict[str, Any]) -> Check:
        name, kty = f"{label}: key type and size", key.get("kty")
        if kty in CURVES:
            ok = key.get("crv") == CURVES[str(kty)]
            return Check(name, ok, f"{kty} {key.get('crv')}" + ("" if ok else " is not accepted"))
        if kty == "RSA":
            bits = _rsa_bits(key.get("n"))
            floor = max(2048, self._profile.min_rsa_bits)
            return Check(name, bits >= floor, f"RSA {bits} bits (at least {floor} required)")
        return Check(name, False, f"key type {kty!r} is not accepted (EC P-256, Ed25519, RSA)")

    def _use_and_alg(self, label: str, key: dict[str, Any]) -> Check:
        name = f"{label}: use and alg consistent, alg allowed"
        if key.get("use") not in (None, "sig"):
            return Check(name, False, f"use {key.get('use')!r}")
        if any(m in key for m in PRIVATE_MEMBERS):
            return Check(name, False, "not checked: the key carries private members")
        try:
            alg, _ = _import(key)
        except JWKError as exc:
            return Check(name, False, str(exc))
        if alg not in self._profile.algorithms:
            return Check(
                name, False, f"{alg} key, but the profile allows {sorted(self._profile.algorithms)}"
            )
        return Check(name, True, f"{alg}, use {key.get('use', 'sig (implicit)')}")

    def _profile_keys_published(self, published: list[Any]) -> Iterator[Check]:
        inline = self._profile.document["keys"].get("jwks")
        if not inline:
            return
        live = set()
        for key in published:
            if isinstance(key, dict) and not (PRIVATE_MEMBERS & key.keys()):
                try:
                    live.add(thumbprint(key))
                except (ValueError, KeyError, TypeError):
                    continue
        for key in inline["keys"]:
            label = key.get("kid", "(no kid)")
            found = thumbprint(key) in live
            yield Check(
                f"profile key {label}: published in the partner's JWKS",
                found,
                "present" if found else "the profile pins a key the partner does not publish",
            )

    # ------------------------------------------------------------------ sample token

    def _sample_checks(self, token: str, jwks: dict[str, Any]) -> list[Check]:
        try:
            jws = parse(token.strip())
            claims = jws.claims()
        except JWSError as exc:
            return [Check("sample: is a signed JWT with an accepted algorithm", False, str(exc))]
        p = self._profile
        named = [h for h in KEY_HEADERS if h in jws.header]
        typ = jws.header.get("typ")
        token_type = token_type_of(typ)
        exp, iat = _number(claims.get("exp")), _number(claims.get("iat"))
        required = [*ALWAYS_REQUIRED, *p.required_claims]
        missing = [c for c in required if claims.get(c) is None]
        lifetime = exp - iat if exp is not None and iat is not None else None
        return [
            Check("sample: header names no key or URL", not named, f"carries {named}" if named else "ok"),
            Check("sample: algorithm allowed", jws.alg in p.algorithms, jws.alg),
            Check(
                "sample: typ names an accepted token type",
                token_type in p.accepted_token_types,
                f"typ {typ!r} -> {token_type}",
            ),
            self._sample_signature(jws, jwks),
            Check("sample: iss equals the profile's", claims.get("iss") in p.issuers, str(claims.get("iss"))),
            Check(
                "sample: aud is this deployment's issuer",
                claims.get("aud") in (self._audience, [self._audience]),
                f"aud {claims.get('aud')!r}, expected {self._audience!r}",
            ),
            Check(
                "sample: lifetime within the profile's maximum",
                lifetime is not None and 0 < lifetime <= p.max_assertion_lifetime,
                f"exp - iat = {lifetime} s, maximum {p.max_assertion_lifetime} s"
                if lifetime is not None else "exp and iat are both required to measure it",
            ),
            Check("sample: required claims present", not missing, f"missing {missing}" if missing else ", ".join(required)),
            Check(
                "sample: not expired",
                exp is not None and exp > time.time(),
                "ok" if exp is not None and exp > time.time() else "expired (or no exp): mint a fresh sample",
            ),
        ]  # fmt: skip

    def _sample_signature(self, jws: Any, jwks: dict[str, Any]) -> Check:
        name = "sample: signature verifies with a published key"
        kid = jws.header.get("kid")
        for key in jwks.get("keys", []):
            if not isinstance(key, dict) or (kid is not None and key.get("kid") != kid):
                continue
            try:
                alg, public = _import(key)
            except JWKError:
                continue
            if alg == jws.alg and jws.verify(public):
                return Check(name, True, f"kid {key.get('kid')!r}")
        return Check(name, False, f"no published {jws.alg} key (kid {kid!r}) verifies it")


def _import(key: dict[str, Any]) -> tuple[str, PublicKey]:
    """The key, refused (not warned about) if weak: the report says why."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return import_public_jwk(key)


def well_known_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be served: RFC 8414 §3.1 (inserted) and OIDC Discovery §4."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return [
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}",
        f"{issuer.rstrip('/')}/.well-known/openid-configuration",
    ]


def _rsa_bits(n: object) -> int:
    if not isinstance(n, str):
        return 0
    try:
        raw = base64.urlsafe_b64decode(n + "=" * (-len(n) % 4))
    except (binascii.Error, ValueError):
        return 0
    return int.from_bytes(raw, "big").bit_length()


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
