"""Trust profiles: the document (YAML or JSON) that says what this deployment accepts from a partner.

A document is checked twice: against the published JSON Schema (``trust-profile.schema.json``, shape
and enumerations), then semantically (LEI check digits, https issuers, public keys only, key sizes,
``jwks_uri`` host allow-list, scopes and audiences that exist here, mapped names that cannot shadow a
registered claim). Every problem is reported, not just the first, each prefixed with its JSON path.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources as pkg_resources
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jsonschema import Draft202012Validator
from stdnum import lei as stdnum_lei

from trustplane.jose.jwk import JWKError, PublicKey, import_public_jwks
from trustplane.outbound.addresses import host_problem
from trustplane.protocol.scopes import Vocabulary
from trustplane.settings import Settings, is_loopback_host

SCHEMA_FILE = "trust-profile.schema.json"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
MAX_DOCUMENT_BYTES = 64 * 1024
#: Claims we set ourselves on issued tokens: a mapped partner attribute may never overwrite them.
RESERVED_ATTRIBUTES = frozenset(
    {
        "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "client_id", "scope", "act", "may_act",
        "cnf", "origin", "partner", "partner_lei", "txn", "tctx", "lei", "authorization_details",
        "typ", "azp", "auth_time", "acr", "amr", "mandate", "provenance",
    }
)  # fmt: skip
#: Claims every partner assertion must carry (RFC 7523 §3); ``required_claims`` adds to these.
ALWAYS_REQUIRED = ("iss", "sub", "aud", "exp", "jti")


class ProfileStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class TokenBinding(StrEnum):
    """``token_binding``: what the tokens issued on this partner's assertions must be bound to
    (BRIEF, trust boundaries: sender-constrained by default, a bearer token only where the profile
    says so). ``sender_constrained``: a DPoP proof (RFC 9449) or a client certificate (RFC 8705);
    ``dpop`` / ``mtls``: that one; ``bearer``: unbound tokens allowed (a proof still binds)."""

    SENDER_CONSTRAINED = "sender_constrained"
    DPOP = "dpop"
    MTLS = "mtls"
    BEARER = "bearer"


class ProfileError(ValueError):
    """The document is not a valid trust profile; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class TrustProfile:
    """A validated profile. ``document`` is the normalised JSON stored and shown; the rest is parsed
    from it for the hot path."""

    partner_id: str
    lei: str
    status: ProfileStatus
    issuers: tuple[str, ...]
    algorithms: frozenset[str]
    max_assertion_lifetime: int
    required_claims: tuple[str, ...]
    claim_mappings: dict[str, str]
    allowed_scopes: frozenset[str]
    allowed_audiences: frozenset[str]
    allowed_products: frozenset[str]
    allowed_regions: frozenset[str]
    accepted_token_types: frozenset[str]
    required_transaction_attributes: tuple[str, ...]
    min_rsa_bits: int
    jwks_uri: str | None
    document: dict[str, Any]
    #: the partner's SSF transmitter configuration URL (``ssf.configuration_url``), if it has one
    ssf_configuration: str | None = None
    #: our client id at the partner's transmitter (``ssf.client_id``): the receiver subscribes
    ssf_client_id: str | None = None
    keys: tuple[tuple[str | None, str, PublicKey], ...] = field(default=(), compare=False)
    version: int = 0
    token_binding: TokenBinding = TokenBinding.SENDER_CONSTRAINED

    @property
    def active(self) -> bool:
        return self.status is ProfileStatus.ACTIVE


@functools.cache
def schema() -> dict[str, Any]:
    """The published JSON Schema (package data; served at ``/federation/trust-profile.schema.json``)."""
    text = pkg_resources.files("trustplane.federation").joinpath(SCHEMA_FILE).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator() -> Draft202012Validator:
    Draft202012Validator.check_schema(schema())
    return Draft202012Validator(schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)


def parse_document(text: str | bytes) -> Any:
    """YAML or JSON (JSON is YAML) into plain data; ``yaml.safe_load`` builds no Python objects."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ProfileError([f"the document is larger than {MAX_DOCUMENT_BYTES} bytes"])
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError([f"not valid YAML or JSON: {exc}".replace("\n", " ")]) from None
    if _unstorable(document):  # a YAML escape (``\0``, ``\ud800``) makes what JSON's gate refuses
        raise ProfileError(["a string holds a NUL character or an unpaired surrogate"])
    return document


def _unstorable(value: Any, depth: int = 0) -> bool:
    """A string PostgreSQL's ``text`` cannot hold (NUL) or UTF-8 cannot encode (a surrogate)."""
    if isinstance(value, str):
        return "\x00" in value or not _encodable(value)
    if depth > _MAX_DEPTH:
        return False  # deeper than any profile: the schema refuses it
    if isinstance(value, dict):
        return any(_unstorable(k, depth + 1) or _unstorable(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(_unstorable(item, depth + 1) for item in value)
    return False


_MAX_DEPTH = 32


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_profile(
    raw: Any, settings: Settings, vocabulary: Vocabulary | None = None
) -> TrustProfile:
    """Return the profile or raise :class:`ProfileError` listing every problem. Without a
    ``vocabulary`` (``partners validate`` on a machine without the deployment's), scopes and
    audiences are only checked for shape."""
    shape = sorted(_validator().iter_errors(raw), key=lambda e: list(e.absolute_path))
    if shape:
        raise ProfileError([f"{_path(e.absolute_path)}: {e.message}" for e in shape])
    doc: dict[str, Any] = dict(raw)
    doc.setdefault("status", ProfileStatus.ACTIVE.value)
    doc.setdefault("min_rsa_bits", 2048)
    # stored in the document, so that the versions and their diff show it
    doc.setdefault("token_binding", TokenBinding.SENDER_CONSTRAINED.value)
    errors: list[str] = []
    keys = _check_keys(doc, settings, errors)
    if "ssf" in doc:
        problem = ssf_configuration_problem(doc["ssf"]["configuration_url"], doc, settings)
        if problem:
            errors.append(f"ssf.configuration_url: {problem}")
    _check_semantics(doc, settings, vocabulary, errors)
    if errors:
        raise ProfileError(errors)
    return build_profile(doc, keys)


def build_profile(
    doc: dict[str, Any], keys: list[tuple[str | None, str, PublicKey]], version: int = 0
) -> TrustProfile:
    """A profile from an already validated document (the store reloads what it stored)."""
    return TrustProfile(
        partner_id=doc["partner_id"],
        lei=doc["lei"],
        status=ProfileStatus(doc.get("status", "active")),
        issuers=tuple(doc["issuers"]),
        algorithms=frozenset(doc["algorithms"]),
        max_assertion_lifetime=int(doc["max_assertion_lifetime"]),
        required_claims=tuple(doc.get("required_claims", ())),
        claim_mappings=dict(doc.get("claim_mappings", {})),
        allowed_scopes=frozenset(doc["allowed_scopes"]),
        allowed_audiences=frozenset(doc["allowed_audiences"]),
        allowed_products=frozenset(doc.get("allowed_products", ())),
        allowed_regions=frozenset(doc.get("allowed_regions", ())),
        accepted_token_types=frozenset(doc["accepted_token_types"]),
        required_transaction_attributes=tuple(doc.get("required_transaction_attributes", ())),
        min_rsa_bits=int(doc.get("min_rsa_bits", 2048)),
        jwks_uri=doc["keys"].get("jwks_uri"),
        document=doc,
        ssf_configuration=doc.get("ssf", {}).get("configuration_url"),
        ssf_client_id=doc.get("ssf", {}).get("client_id"),
        keys=tuple(keys),
        version=version,
        # a profile stored before the setting existed gets the default, as a new one does
        token_binding=TokenBinding(doc.get("token_binding", TokenBinding.SENDER_CONSTRAINED)),
    )


def inline_keys(doc: dict[str, Any]) -> list[tuple[str | None, str, PublicKey]]:
    jwks = doc["keys"].get("jwks")
    return import_public_jwks(jwks) if jwks else []


def _check_keys(
    doc: dict[str, Any], settings: Settings, errors: list[str]
) -> list[tuple[str | None, str, PublicKey]]:
    spec = doc["keys"]
    if "jwks_uri" in spec:
        problem = jwks_uri_problem(spec["jwks_uri"], settings)
        if problem:
            errors.append(f"keys.jwks_uri: {problem}")
        return []
    try:
        keys = inline_keys(doc)
    except JWKError as exc:
        errors.append(f"keys.jwks: {exc}")
        return []
    for kid, alg, key in keys:
        name = kid or "(no kid)"
        if alg not in doc["algorithms"]:
            errors.append(f"keys.jwks: key {name} is an {alg} key, not in algorithms")
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < doc["min_rsa_bits"]:
            errors.append(f"keys.jwks: key {name} has {key.key_size} bits, below min_rsa_bits")
    return keys


def ssf_configuration_problem(uri: str, doc: dict[str, Any], settings: Settings) -> str | None:
    """Why the partner's SSF configuration URL is not acceptable: https (http only on loopback in
    development), no credentials or query, and on the host of one of the partner's issuers (SSF
    1.0 §7.2: the configuration is published under the transmitter's issuer)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "not a valid URL"
    insecure_ok = settings.federation_allow_insecure_loopback and is_loopback_host(parts.hostname)
    if parts.scheme != "https" and not (parts.scheme == "http" and insecure_ok):
        return "must use https"
    if not parts.hostname or parts.username is not None or parts.query:
        return "must be an absolute URL without credentials or query"
    hosts = {urlsplit(i).netloc.lower() for i in doc["issuers"]}
    if parts.netloc.lower() not in hosts:
        return "must be on the host of one of the partner's issuers"
    return None


def jwks_uri_problem(uri: str, settings: Settings) -> str | None:
    """Why this partner ``jwks_uri`` is not acceptable (None if it is): https, an allow-listed host,
    and not a host that can never be fetched (an address that is not public, a local name; checked
    again on the resolved address at every fetch, :mod:`trustplane.outbound`)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "not a valid URL"
    insecure_ok = settings.federation_allow_insecure_loopback and is_loopback_host(parts.hostname)
    if parts.scheme != "https" and not (parts.scheme == "http" and insecure_ok):
        return "must use https"
    if not parts.hostname or parts.username is not None or parts.fragment:
        return "must be an absolute URL without credentials or fragment"
    problem = host_problem(
        parts.hostname, allow_loopback=settings.federation_allow_insecure_loopback
    )
    if problem is not None:
        return f"{problem}; it is never fetched"
    if parts.hostname not in settings.federation_jwks_hosts and not insecure_ok:
        return (
            f"host {parts.hostname!r} is not in TRUSTPLANE_FEDERATION_JWKS_HOSTS "
            "(the allow-list of hosts partner keys may be fetched from)"
        )
    return None


def _check_semantics(
    doc: dict[str, Any], settings: Settings, vocabulary: Vocabulary | None, errors: list[str]
) -> None:
    if not stdnum_lei.is_valid(doc["lei"]):
        errors.append("lei: not a valid ISO 17442 LEI (check digits)")
    for i, issuer in enumerate(doc["issuers"]):
        parts = urlsplit(issuer)
        insecure_ok = settings.federation_allow_insecure_loopback and is_loopback_host(
            parts.hostname
        )
        if parts.scheme != "https" and not insecure_ok:
            errors.append(f"issuers[{i}]: must use https")
        if issuer == settings.issuer:
            errors.append(f"issuers[{i}]: is this deployment's own issuer")
    for claim, attribute in doc.get("claim_mappings", {}).items():
        if attribute in RESERVED_ATTRIBUTES:
            errors.append(f"claim_mappings.{claim}: {attribute!r} is a reserved claim name")
    if len(set(doc.get("claim_mappings", {}).values())) != len(doc.get("claim_mappings", {})):
        errors.append("claim_mappings: two partner claims map to the same local attribute")
    if vocabulary is None:
        return
    for scope in doc["allowed_scopes"]:
        if scope not in vocabulary.scopes:
            errors.append(f"allowed_scopes: unknown scope {scope!r}")
    for audience in doc["allowed_audiences"]:
        if audience not in vocabulary.resources:
            errors.append(f"allowed_audiences: unknown resource {audience!r}")


def _path(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return ("$" + "".join(parts)) if parts else "$"
