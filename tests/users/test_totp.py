"""RFC 6238 Appendix B vectors (SHA-1, 8 digits, seed "12345678901234567890") and the one-use rule."""

from __future__ import annotations

import base64

import pytest

from trustplane.users import totp

SEED = b"12345678901234567890"
VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("at", "expected"), VECTORS)
def test_rfc6238_appendix_b_sha1(at: int, expected: str) -> None:
    assert totp.hotp(SEED, at // 30, digits=8) == expected


def test_verify_accepts_the_window_and_refuses_replay() -> None:
    secret = base64.b32encode(SEED).decode()
    now = 1_800_000_000.0
    code = totp.now_code(secret, at=now)
    step = totp.verify(secret, code, at=now)
    assert step == int(now // 30)
    assert totp.verify(secret, code, after_step=step, at=now) is None  # used once already
    assert totp.verify(secret, totp.now_code(secret, at=now - 30), at=now) == step - 1  # drift
    assert totp.verify(secret, totp.now_code(secret, at=now - 90), at=now) is None
    assert totp.verify(secret, "12345", at=now) is None
    assert totp.verify(secret, "abcdef", at=now) is None


def test_provisioning_uri_names_the_account() -> None:
    uri = totp.provisioning_uri("JBSWY3DPEHPK3PXP", "alice", "trustplane")
    assert uri.startswith("otpauth://totp/trustplane%3Aalice?secret=JBSWY3DPEHPK3PXP")
