"""Redirect URI matching (RFC 6749 §3.1.2.3, RFC 8252 §7.3) and the sealed browser values."""

from __future__ import annotations

import pytest

from tests.conftest import make_settings
from trustplane.authorize.http import AuthorizeHttp
from trustplane.authorize.pkce import s256, verifier_matches
from trustplane.authorize.redirects import match_redirect_uri
from trustplane.authorize.sealing import Sealer

REGISTERED = ("https://client.example/cb", "http://127.0.0.1:4711/cb", "http://[::1]/cb?app=1")


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("https://client.example/cb", "https://client.example/cb"),
        ("http://127.0.0.1:4711/cb", "http://127.0.0.1:4711/cb"),
        ("http://127.0.0.1:50000/cb", "http://127.0.0.1:4711/cb"),  # RFC 8252 §7.3: any port
        ("http://127.0.0.1/cb", "http://127.0.0.1:4711/cb"),
        ("http://[::1]:6000/cb?app=1", "http://[::1]/cb?app=1"),
        ("https://client.example:8443/cb", None),  # the port exception is for loopback only
        ("http://127.0.0.1:50000/cb/", None),
        ("http://127.0.0.1:50000/CB", None),
        ("http://127.0.0.1:50000/cb?x=1", None),
        ("http://127.0.0.1:99999/cb", None),
        ("http://127.0.0.1:4711@evil.example/cb", None),
        ("http://127.0.0.1.evil.example/cb", None),
        ("http://127.0.0.1:4711/cb#f", None),
        ("https://127.0.0.1:4711/cb", None),
        ("http://[::1]:6000/cb", None),
        ("http://localhost:4711/cb", None),
        ("https://client.example/cb/../cb", None),
        ("https://client.example/%63b", None),
        ("HTTPS://client.example/cb", None),
        # exact comparison: a trailing newline is another URI (a ``$`` anchor let it through)
        ("http://127.0.0.1:50000/cb\n", None),
        ("http://127.0.0.1:4711/cb\n", None),
        ("http://[::1]:6000/cb?app=1\n", None),
        ("https://client.example/cb\n", None),
        # the port is ASCII digits (``\\d`` also matches other scripts' digits, which int() reads)
        ("http://127.0.0.1:\u0664\u0667\u0661\u0661/cb", None),
    ],
)
def test_match_redirect_uri(requested: str, expected: str | None) -> None:
    assert match_redirect_uri(requested, REGISTERED) == expected


def test_pkce_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert verifier_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert not verifier_matches(verifier + "x", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert not verifier_matches("a" * 42, s256("a" * 42))  # below the 43-character minimum
    assert not verifier_matches("a b" * 20, s256("a b" * 20))  # outside the character set
    # RFC 7636 §4.1: a trailing newline is outside the character set too (not let through by ``$``)
    assert not verifier_matches("a" * 43 + "\n", s256("a" * 43 + "\n"))


def test_sealed_values_resist_tampering_reuse_and_age() -> None:
    sealer = Sealer(b"k" * 32)
    sealed = sealer.seal("session", {"sid": "abc"}, 60)
    assert sealer.open("session", sealed)["sid"] == "abc"  # type: ignore[index]
    assert sealer.open("request", sealed) is None  # another purpose
    body, mac = sealed.split(".")
    assert sealer.open("session", body + "x." + mac) is None
    assert sealer.open("session", body + "." + mac[:-2] + "AA") is None
    assert Sealer(b"j" * 32).open("session", sealed) is None  # another deployment's key
    assert sealer.open("session", sealer.seal("session", {"sid": "abc"}, -1)) is None
    assert sealer.open("session", None) is None
    assert sealer.open("session", "garbage") is None


def test_csrf_token_is_bound_to_the_session() -> None:
    sealer = Sealer(b"k" * 32)
    token = sealer.csrf_token("sid-1")
    assert sealer.csrf_ok("sid-1", token)
    assert not sealer.csrf_ok("sid-2", token)
    assert not sealer.csrf_ok("sid-1", None)
    assert not sealer.csrf_ok("sid-1", "")


def test_session_cookie_is_host_prefixed_and_secure_under_https(tmp_path: object) -> None:
    settings = make_settings("sqlite+aiosqlite://", tmp_path, issuer="https://as.example")  # type: ignore[arg-type]
    pages = AuthorizeHttp(settings, None, None, Sealer(b"k" * 32))  # type: ignore[arg-type]
    from starlette.responses import Response

    response = Response()
    pages._set_cookie(response, {"sid": "s"})
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("__Host-trustplane_session=")
    assert "Secure" in cookie
    assert "Domain" not in cookie
