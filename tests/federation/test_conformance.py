"""The conformance checker against a real HTTP server on loopback serving a partner's metadata and
JWKS, good and deliberately bad, driven through the CLI exactly as an onboarding CI job would."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import jwks_for
from tests.federation.partners import Partner

TRUSTPLANE = str(Path(sys.executable).with_name("trustplane"))
OUR_ISSUER = "http://127.0.0.1:8000"


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        status, body = self.routes.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@dataclass
class Sandbox:
    """The partner's sandbox: ``base`` is http://127.0.0.1:PORT; tenants live under paths."""

    base: str
    routes: dict[str, tuple[int, bytes]]
    seen: list[str]

    def serve(self, path: str, body: Any, status: int = 200) -> None:
        self.routes[path] = (status, json.dumps(body).encode())


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    routes: dict[str, tuple[int, bytes]] = {}
    seen: list[str] = []
    handler = type("Handler", (_Handler,), {"routes": routes, "seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Sandbox(f"http://127.0.0.1:{httpd.server_address[1]}", routes, seen)
    finally:
        httpd.shutdown()
        httpd.server_close()


def conformance(
    tmp_path: Path, profile: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    env["TRUSTPLANE_DATA_DIR"] = str(tmp_path)
    return subprocess.run(
        [TRUSTPLANE, "partners", "conformance", str(path), *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def token_file(tmp_path: Path, token: str) -> str:
    path = tmp_path / "sample.jwt"
    path.write_text(token + "\n")
    return str(path)


def _tenant(sandbox: Sandbox, name: str) -> tuple[Partner, str]:
    """A partner whose issuer is ``{base}/{name}``; returns it and its RFC 8414 metadata URL."""
    partner = Partner(f"sandbox-{name}", f"{sandbox.base}/{name}", OUR_ISSUER)
    return partner, f"{sandbox.base}/.well-known/oauth-authorization-server/{name}"


def test_a_conforming_partner_passes_every_check(sandbox: Sandbox, tmp_path: Path) -> None:
    partner, url = _tenant(sandbox, "good")
    sandbox.serve(
        "/.well-known/oauth-authorization-server/good",
        {
            "issuer": partner.issuer,
            "jwks_uri": f"{sandbox.base}/good/jwks",
            "id_token_signing_alg_values_supported": ["ES256"],
            "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
            "id_token_encryption_alg_values_supported": ["RSA-OAEP-256"],
        },
    )
    sandbox.serve("/good/jwks", jwks_for(partner.key, partner.kid))
    sample = token_file(tmp_path, partner.assertion())

    proc = conformance(
        tmp_path, partner.profile(), "--metadata-url", url, "--sample-token", sample,
        "--allow-insecure-loopback", "--json",
    )  # fmt: skip

    report = json.loads(proc.stdout)
    assert proc.returncode == 0, [c for c in report["checks"] if not c["ok"]]
    assert report["ok"] is True
    names = {c["check"] for c in report["checks"]}
    assert {
        "metadata: issuer equals the profile's (byte for byte)",
        "metadata: served from the issuer's well-known location",
        "metadata: advertises an algorithm the profile allows",
        "jwks: kid values present and unique",
        "jwks key p1: key type and size",
        "jwks key p1: no private or symmetric members",
        "profile key p1: published in the partner's JWKS",
        "sample: signature verifies with a published key",
        "sample: lifetime within the profile's maximum",
        "sample: required claims present",
        "profile: token binding",
    } <= names
    assert len(report["checks"]) >= 18
    (binding,) = [c for c in report["checks"] if c["check"] == "profile: token binding"]
    assert binding["detail"].startswith("bearer: ")  # the fixture's explicit exception
    default = conformance(
        tmp_path, partner.profile(token_binding=None), "--metadata-url", url,
        "--allow-insecure-loopback", "--json",
    )  # fmt: skip
    (binding,) = [
        c for c in json.loads(default.stdout)["checks"] if c["check"] == "profile: token binding"
    ]
    assert binding["detail"].startswith("sender_constrained: ")


def _rsa_public(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """Built by hand: JOSE libraries (rightly) refuse to export a 1024-bit key without a warning."""
    numbers = key.public_key().public_numbers()

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return {"kty": "RSA", "n": b64(numbers.n), "e": b64(numbers.e)}


def _bad_jwks(partner: Partner) -> dict[str, Any]:
    good = jwks_for(partner.key, partner.kid)["keys"][0]
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - deliberately weak
    return {
        "keys": [
            {**good, "d": "c2VjcmV0"},  # private member
            {**_rsa_public(weak), "kid": "weak", "alg": "PS256"},  # 1024-bit RSA
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},  # symmetric
            {**good, "kid": "mislabelled", "alg": "EdDSA"},  # alg inconsistent with the key
            {**good, "kid": "weak"},  # duplicate kid
        ]
    }


def test_deliberately_bad_metadata_jwks_and_sample_fail_each_check(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    partner, url = _tenant(sandbox, "bad")
    sandbox.serve(
        "/.well-known/oauth-authorization-server/bad",
        {
            "issuer": partner.issuer + "/",  # not byte-equal
            "jwks_uri": f"{sandbox.base}/bad/jwks",
            "id_token_signing_alg_values_supported": ["RS256", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["none"],
            "request_object_signing_alg_values_supported": ["HS256", "RS256"],
            "dpop_signing_alg_values_supported": "ES256",  # not an array
            "userinfo_encryption_alg_values_supported": ["none"],
        },
    )
    sandbox.serve("/bad/jwks", _bad_jwks(partner))
    now = int(time.time())
    sample = partner.assertion(
        _headers={"jku": f"{sandbox.base}/evil"},
        iat=now - 1000, exp=now - 100, desk=None, aud="https://someone-else.example",
    )  # fmt: skip

    proc = conformance(
        tmp_path, partner.profile(), "--metadata-url", url,
        "--sample-token", token_file(tmp_path, sample), "--allow-insecure-loopback", "--json",
    )  # fmt: skip

    assert proc.returncode == 1
    failed = {c["check"]: c["detail"] for c in json.loads(proc.stdout)["checks"] if not c["ok"]}
    expected = {
        "metadata: issuer equals the profile's (byte for byte)",
        "metadata: advertises an algorithm the profile allows",
        "metadata: id_token_signing_alg_values_supported",
        "metadata: token_endpoint_auth_signing_alg_values_supported",
        "metadata: request_object_signing_alg_values_supported",
        "metadata: dpop_signing_alg_values_supported",
        "metadata: userinfo_encryption_alg_values_supported",
        "jwks: kid values present and unique",
        "jwks key p1: no private or symmetric members",
        "jwks key weak: key type and size",
        "jwks key hmac: no private or symmetric members",
        "jwks key hmac: key type and size",
        "jwks key mislabelled: use and alg consistent, alg allowed",
        "sample: header names no key or URL",
        "sample: aud is this deployment's issuer",
        "sample: lifetime within the profile's maximum",
        "sample: required claims present",
        "sample: not expired",
    }
    assert expected <= set(failed), sorted(set(failed))
    assert "1024 bits" in failed["jwks key weak: key type and size"]
    none = "advertises 'none' (unsigned); RFC 8414 §2 forbids it"
    assert failed["metadata: token_endpoint_auth_signing_alg_values_supported"] == none
    assert failed["metadata: id_token_signing_alg_values_supported"] == none
    assert failed["metadata: userinfo_encryption_alg_values_supported"] == none
    assert failed["metadata: request_object_signing_alg_values_supported"].startswith(
        "advertises ['HS256', 'RS256'], outside the profile's algorithms"
    )
    assert failed["metadata: dpop_signing_alg_values_supported"] == (
        "must be a non-empty array of algorithm names"
    )
    assert "desk" in failed["sample: required claims present"]
    assert "/evil" not in sandbox.seen  # the sample's jku was never followed


@pytest.mark.parametrize(
    ("member", "values", "detail"),
    [
        (
            "token_endpoint_auth_signing_alg_values_supported",
            ["ES256", "none"],
            "advertises 'none' (unsigned); RFC 8414 §2 forbids it",
        ),
        (
            "revocation_endpoint_auth_signing_alg_values_supported",
            ["ES256", "RS256"],
            "advertises ['RS256'], outside the profile's algorithms ['ES256']",
        ),
    ],
)
def test_one_bad_alg_member_fails_the_partner_and_is_named(
    sandbox: Sandbox, tmp_path: Path, member: str, values: list[str], detail: str
) -> None:
    """Everything else conforms: the one member is enough to fail, and the finding names it."""
    partner, url = _tenant(sandbox, "subtle")
    sandbox.serve(
        "/.well-known/oauth-authorization-server/subtle",
        {
            "issuer": partner.issuer,
            "jwks_uri": f"{sandbox.base}/subtle/jwks",
            "id_token_signing_alg_values_supported": ["ES256"],
            member: values,
        },
    )
    sandbox.serve("/subtle/jwks", jwks_for(partner.key, partner.kid))
    proc = conformance(
        tmp_path, partner.profile(), "--metadata-url", url, "--allow-insecure-loopback", "--json"
    )
    assert proc.returncode == 1
    failed = {c["check"]: c["detail"] for c in json.loads(proc.stdout)["checks"] if not c["ok"]}
    assert failed == {f"metadata: {member}": detail}


def test_rich_report_and_exit_code_without_json(sandbox: Sandbox, tmp_path: Path) -> None:
    partner, url = _tenant(sandbox, "missing")  # nothing served there: 404
    proc = conformance(
        tmp_path, partner.profile(), "--metadata-url", url, "--allow-insecure-loopback"
    )
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout
    assert "metadata: fetched" in proc.stdout
    assert "404" in proc.stdout


def test_plain_http_needs_the_explicit_flag(sandbox: Sandbox, tmp_path: Path) -> None:
    partner, url = _tenant(sandbox, "good")
    proc = conformance(tmp_path, partner.profile(), "--metadata-url", url, "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["valid"] is False  # the profile's http issuer is refused
    profile = partner.profile(issuers=["https://idp.secure.example"])
    https_profile = conformance(tmp_path, profile, "--metadata-url", url, "--json")
    report = json.loads(https_profile.stdout)
    assert https_profile.returncode == 1
    assert report["checks"][0]["check"] == "metadata: fetched"
    assert "must use https" in report["checks"][0]["detail"]
