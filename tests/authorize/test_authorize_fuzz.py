"""Mutated authorization requests: whatever the parameters, the endpoint answers 200 (a page), 302
(an error redirect) or 400 (an error page), never 5xx, and it never redirects anywhere but a
registered redirect URI. Deterministic (seeded) so a failure reproduces."""

from __future__ import annotations

import random
from urllib.parse import quote, urlencode

import pytest

from tests.authorize.conftest import Setup
from tests.authorize.flow import REDIRECT_URI

pytestmark = pytest.mark.asyncio(loop_scope="module")
CASES = 300
JUNK = [
    "",
    " ",
    "%",
    "%zz",
    "\u0000",
    "\ud7ff\ue000",
    "é",
    "😀" * 50,
    "x" * 5000,
    "[",
    "[]",
    "[{}]",
    '[{"type": null}]',
    "null",
    "{}",
    "https://client.example/cb#x",
    "https://evil.example/cb",
    "javascript:alert(1)",
    "S256",
    "plain",
    "code",
    "token",
    "A" * 43,
    "login",
    "none",
]


def mutate(rng: random.Random, params: dict[str, str]) -> str:
    pairs = list(params.items())
    for _ in range(rng.randint(1, 4)):
        action = rng.choice(["drop", "junk", "dup", "add"])
        if action == "drop" and pairs:
            pairs.pop(rng.randrange(len(pairs)))
        elif action == "junk" and pairs:
            i = rng.randrange(len(pairs))
            pairs[i] = (pairs[i][0], rng.choice(JUNK))
        elif action == "dup" and pairs:
            pairs.append(rng.choice(pairs))
        else:
            pairs.append((rng.choice(["request_uri", "prompt", "max_age", "nonce", "x"]), "1"))
    if rng.random() < 0.1:  # raw, possibly invalid percent-encoding
        return "&".join(f"{k}={quote(rng.choice(JUNK), safe='%[]{}:/,')}" for k, _ in pairs)
    return urlencode(pairs, quote_via=quote)


async def test_mutated_authorization_requests_fail_safely(setup: Setup) -> None:
    rng = random.Random(20261129)
    flow = setup.flow()
    registered = (REDIRECT_URI, "http://127.0.0.1:4711/callback")
    seen: set[int] = set()
    for _ in range(CASES):
        query = mutate(rng, flow.params())
        response = await flow.http.get(f"/authorize?{query}")
        seen.add(response.status_code)
        assert response.status_code in (200, 302, 400), (query, response.text[:500])
        if response.status_code == 302:
            location = response.headers["location"]
            assert location.startswith(tuple(uri + "?" for uri in registered)), location
    assert {200, 302, 400} <= seen  # the mutations reached every kind of answer
