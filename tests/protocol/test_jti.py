"""``new_jti``: 128 bits, unique, 80 of them random, the text sorting by the millisecond it was made
in (rows keyed by it are appended to their b-trees instead of landing on random pages)."""

from __future__ import annotations

import binascii
import os
import re

import pytest

from trustplane import ids
from trustplane.ids import new_jti

_ORDERED = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _bytes(jti: str) -> bytes:
    """The 16 bytes behind a jti (its characters stand for the values of their place in
    ``_ORDERED``)."""
    text = jti.translate(str.maketrans(_ORDERED, _BASE64))
    return binascii.a2b_base64(text + "==")


def _at(monkeypatch: pytest.MonkeyPatch, millis: int) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: millis * 1_000_000 + 999_999)


def test_shape_url_safe_22_characters_128_bits() -> None:
    for jti in (new_jti() for _ in range(1000)):
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", jti)
        assert len(_bytes(jti)) == 16
        assert not jti.startswith("-")  # never read as an option on a command line


def test_unique() -> None:
    assert len({new_jti() for _ in range(100_000)}) == 100_000


def test_the_text_sorts_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # each step carries into a higher character of the time field (and the first jump is far)
    moments = [0, 1, 63, 64, 255, 256, 4095, 4096, 1_764_979_200_000, 1_764_979_200_001,
               1_764_979_200_064, 1_764_979_262_144, 4_102_444_800_000]  # fmt: skip
    made = []
    for millis in moments:
        _at(monkeypatch, millis)
        made += [new_jti() for _ in range(20)]
    for earlier, later in zip(made[::20], made[20::20], strict=False):
        assert earlier[:8] < later[:8]
    # within a millisecond the order is the random part's: only across milliseconds it is time's
    by_time = [sorted(made[i : i + 20]) for i in range(0, len(made), 20)]
    assert sorted(made) == [jti for group in by_time for jti in group]


def test_the_first_48_bits_count_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    _at(monkeypatch, 1_764_979_200_123)
    first = int.from_bytes(_bytes(new_jti())[:6], "big")
    _at(monkeypatch, 1_764_979_200_124)
    assert int.from_bytes(_bytes(new_jti())[:6], "big") == first + 1


def test_the_other_80_bits_are_fresh_random_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[bytes] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        drawn.append(real(n))
        return drawn[-1]

    monkeypatch.setattr(ids.os, "urandom", urandom)
    _at(monkeypatch, 1_764_979_200_123)
    jtis = [new_jti() for _ in range(2000)]
    assert len(drawn) == len(jtis)
    assert {len(d) for d in drawn} == {10}
    assert all(_bytes(j)[6:] == d for j, d in zip(jtis, drawn, strict=True))
    # in one millisecond, every one of the 80 bits takes both values
    tails = [int.from_bytes(_bytes(j)[6:], "big") for j in jtis]
    assert all(0 < sum(t >> bit & 1 for t in tails) < len(tails) for bit in range(80))
