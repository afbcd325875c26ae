"""Trust profile documents: the published schema, and every refusal with the path it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jsonschema import Draft202012Validator

from tests.conftest import EXECUTION, make_settings
from tests.federation.partners import Partner
from trustplane.federation.profile import (
    ProfileError,
    ProfileStatus,
    TokenBinding,
    parse_document,
    schema,
    validate_profile,
)
from trustplane.keys.crypto import public_jwk
from trustplane.protocol.scopes import load_vocabulary, with_internal_apis
from trustplane.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "partners" / "arranger.yaml"
ISSUER = "http://127.0.0.1:8000"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        "sqlite+aiosqlite:///unused.db", tmp_path, federation_jwks_hosts=("keys.partner.example",)
    )


def _validate(doc: Any, settings: Settings) -> Any:
    vocabulary = with_internal_apis(load_vocabulary(None), settings.issuer)
    return validate_profile(doc, settings, vocabulary)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(schema())
    assert schema()["additionalProperties"] is False


def test_example_profile_validates_and_round_trips(settings: Settings) -> None:
    profile = _validate(parse_document(EXAMPLE.read_text()), settings)
    assert profile.partner_id == "arranger-emea"
    assert profile.status is ProfileStatus.ACTIVE
    assert [kid for kid, _, _ in profile.keys] == ["arranger-2026-11"]
    assert profile.claim_mappings["https://arranger.example/claims/product"] == "product"


def test_json_documents_are_accepted(settings: Settings) -> None:
    import json

    doc = Partner("partner-j", "https://idp.j.example", ISSUER).profile()
    assert _validate(parse_document(json.dumps(doc)), settings).partner_id == "partner-j"


def _rsa_jwk(bits: int) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return {**public_jwk(key), "kid": "r1", "alg": "PS256"}


def _with_private(p: Partner) -> dict[str, Any]:
    jwk = dict(p.profile()["keys"]["jwks"]["keys"][0])
    jwk["d"] = "AAAA"
    return {"jwks": {"keys": [jwk]}}


REFUSALS: dict[str, tuple[Any, str]] = {
    "not an object": (lambda p: ["a", "list"], "$: ['a', 'list'] is not of type 'object'"),
    "unknown member": (lambda p: p.profile(trust_everyone=True), "Additional properties"),
    "missing issuers": (lambda p: p.profile(issuers=None), "'issuers' is a required property"),
    "bad partner id": (lambda p: p.profile(partner_id="Partner A"), "$.partner_id"),
    "LEI check digits": (lambda p: p.profile(lei="529900T8BM49AURSDO56"), "lei: not a valid"),
    "http issuer": (lambda p: p.profile(issuers=["http://idp.p.example"]), "issuers[0]: must use https"),
    "our own issuer": (lambda p: p.profile(issuers=[ISSUER]), "this deployment's own issuer"),
    "HS256": (lambda p: p.profile(algorithms=["HS256"]), "$.algorithms[0]: 'HS256' is not one of"),
    "none": (lambda p: p.profile(algorithms=["none"]), "$.algorithms[0]: 'none' is not one of"),
    "private key member": (lambda p: p.profile(keys=_with_private(p)), "private or symmetric"),
    "symmetric key": (
        lambda p: p.profile(keys={"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}),
        "private or symmetric",
    ),
    "key of an algorithm not allowed": (
        lambda p: p.profile(
            keys={"jwks": {"keys": [{**public_jwk(ed25519.Ed25519PrivateKey.generate()), "kid": "e"}]}}
        ),
        "is an EdDSA key, not in algorithms",
    ),
    "RSA below min_rsa_bits": (
        lambda p: p.profile(algorithms=["PS256"], min_rsa_bits=3072, keys={"jwks": {"keys": [_rsa_jwk(2048)]}}),
        "2048 bits, below min_rsa_bits",
    ),
    "both jwks and jwks_uri": (
        lambda p: p.profile(keys={**p.profile()["keys"], "jwks_uri": "https://keys.partner.example/j"}),
        "$.keys",
    ),
    "jwks_uri host not allow-listed": (
        lambda p: p.profile(keys={"jwks_uri": "https://elsewhere.example/jwks"}),
        "not in TRUSTPLANE_FEDERATION_JWKS_HOSTS",
    ),
    "jwks_uri over http": (
        lambda p: p.profile(keys={"jwks_uri": "http://keys.partner.example/jwks"}),
        "keys.jwks_uri: must use https",
    ),
    "jwks_uri on the metadata service": (
        lambda p: p.profile(keys={"jwks_uri": "https://169.254.169.254/latest/jwks"}),
        "keys.jwks_uri: host 169.254.169.254 is link-local; it is never fetched",
    ),
    "jwks_uri on a private address": (
        lambda p: p.profile(keys={"jwks_uri": "https://10.20.30.40/jwks"}),
        "keys.jwks_uri: host 10.20.30.40 is private; it is never fetched",
    ),
    "jwks_uri on localhost": (
        lambda p: p.profile(keys={"jwks_uri": "https://localhost:8443/jwks"}),
        "keys.jwks_uri: host localhost is a local name; it is never fetched",
    ),
    "lifetime over an hour": (lambda p: p.profile(max_assertion_lifetime=7200), "$.max_assertion_lifetime"),
    "unknown scope": (lambda p: p.profile(allowed_scopes=["trade:everything"]), "unknown scope"),
    "unknown audience": (
        lambda p: p.profile(allowed_audiences=["https://nowhere.example/api"]),
        "unknown resource",
    ),
    "mapping onto a reserved claim": (
        lambda p: p.profile(claim_mappings={"user": "sub"}),
        "'sub' is a reserved claim name",
    ),
    "two claims onto one attribute": (
        lambda p: p.profile(claim_mappings={"a": "desk", "b": "desk"}),
        "map to the same local attribute",
    ),
    "token type not supported": (
        lambda p: p.profile(accepted_token_types=["urn:ietf:params:oauth:token-type:id_token"]),
        "$.accepted_token_types[0]",
    ),
    "bad status": (lambda p: p.profile(status="paused"), "$.status"),
    "ssf: not the configuration path": (
        lambda p: p.profile(ssf={"configuration_url": "https://idp.x.example/ssf"}), "$.ssf.configuration_url",
    ),
    "ssf: unknown member": (
        lambda p: p.profile(ssf={"configuration_url": SSF_URL, "poll": True}), "$.ssf",
    ),
    "ssf: no configuration_url": (lambda p: p.profile(ssf={}), "$.ssf"),
    "ssf: another host than the issuers'": (
        lambda p: p.profile(ssf={"configuration_url": "https://evil.example/.well-known/ssf-configuration"}),
        "ssf.configuration_url: must be on the host of one of the partner's issuers",
    ),
    "ssf: over http": (
        lambda p: p.profile(ssf={"configuration_url": "http://idp.x.example/.well-known/ssf-configuration"}),
        "ssf.configuration_url: must use https",
    ),
}  # fmt: skip
SSF_URL = "https://idp.x.example/.well-known/ssf-configuration"


def test_ssf_member_is_kept(settings: Settings) -> None:
    doc = Partner("partner-x", "https://idp.x.example", ISSUER).profile(
        ssf={"configuration_url": SSF_URL}
    )
    profile = _validate(doc, settings)
    assert profile.ssf_configuration == SSF_URL
    assert profile.document["ssf"] == {"configuration_url": SSF_URL}
    assert (
        _validate(
            Partner("p-y", "https://idp.y.example", ISSUER).profile(), settings
        ).ssf_configuration
        is None
    )


@pytest.mark.parametrize("case", list(REFUSALS))
def test_invalid_profiles_are_refused_with_the_path(settings: Settings, case: str) -> None:
    make, expected = REFUSALS[case]
    with pytest.raises(ProfileError) as caught:
        _validate(make(Partner("partner-x", "https://idp.x.example", ISSUER)), settings)
    assert any(expected in e for e in caught.value.errors), caught.value.errors


def test_every_problem_is_reported_not_just_the_first(settings: Settings) -> None:
    doc = Partner("partner-x", "https://idp.x.example", ISSUER).profile(
        lei="529900T8BM49AURSDO56",
        issuers=["http://idp.x.example"],
        allowed_scopes=["trade:everything"],
    )
    with pytest.raises(ProfileError) as caught:
        _validate(doc, settings)
    assert len(caught.value.errors) == 3


def test_unparseable_and_oversized_documents(settings: Settings) -> None:
    with pytest.raises(ProfileError, match="not valid YAML"):
        parse_document("partner_id: [unclosed")
    with pytest.raises(ProfileError, match="larger than"):
        parse_document("x" * 70_000)


def test_yaml_tags_do_not_build_objects() -> None:
    with pytest.raises(ProfileError):
        parse_document("!!python/object/apply:os.system ['true']")


def test_loopback_http_only_with_the_explicit_flag(tmp_path: Path) -> None:
    doc = Partner("partner-l", "http://127.0.0.1:9999", ISSUER).profile(
        keys={"jwks_uri": "http://127.0.0.1:9999/jwks"}
    )
    strict = make_settings("sqlite+aiosqlite:///unused.db", tmp_path)
    with pytest.raises(ProfileError) as caught:
        _validate(doc, strict)
    assert len(caught.value.errors) == 2
    lax = make_settings(
        "sqlite+aiosqlite:///unused.db", tmp_path, federation_allow_insecure_loopback=True
    )
    assert _validate(doc, lax).jwks_uri == "http://127.0.0.1:9999/jwks"
    assert EXECUTION in _validate(doc, lax).allowed_audiences


def test_token_binding_defaults_to_sender_constrained_and_is_stored(settings: Settings) -> None:
    doc = Partner("p-doc", "https://idp.p-doc.example", ISSUER).profile(token_binding=None)
    profile = _validate(doc, settings)
    assert profile.token_binding is TokenBinding.SENDER_CONSTRAINED
    # in the stored document, so the version history and its diff show it
    assert profile.document["token_binding"] == "sender_constrained"


@pytest.mark.parametrize("value", ["dpop", "mtls", "bearer", "sender_constrained"])
def test_token_binding_values(settings: Settings, value: str) -> None:
    doc = Partner("p-doc", "https://idp.p-doc.example", ISSUER).profile(token_binding=value)
    assert _validate(doc, settings).token_binding is TokenBinding(value)


@pytest.mark.parametrize("value", ["none", "DPoP", "", 1, ["dpop"]])
def test_an_unknown_token_binding_is_refused(settings: Settings, value: object) -> None:
    doc = Partner("p-doc", "https://idp.p-doc.example", ISSUER).profile(token_binding=value)
    with pytest.raises(ProfileError) as raised:
        _validate(doc, settings)
    assert [e.split(":")[0] for e in raised.value.errors] == ["$.token_binding"]
