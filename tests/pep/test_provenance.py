"""The chain of authority a resource server requires of a delegated token (``ChainRequirement``):
the act chain, the provenance chain, the origin, the mandate and the transaction, each refused with
403 ``insufficient_scope`` before the PDP is asked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from tests.pep.conftest import AUDIENCE, ISSUER, FakeIssuer
from tests.pep.test_http import CountingPdp, context_of, engine, order_of
from trustplane.pep import ChainRequirement, PolicyEnforcer, TokenValidator, TrustedIssuer
from trustplane.pep.http import Grant, Pep
from trustplane.pep.provenance import issuers

ARRANGER = "https://arranger.example"
#: The clearing side's rule: our member (ISSUER) acts for the arranger; the token derives from an
#: arranger token that derives from another arranger token (the user's); origin, mandate and txn.
RULE = ChainRequirement(
    actors=(ISSUER, ARRANGER),
    provenance=(ARRANGER, ARRANGER),
    origin=ARRANGER,
    mandate=True,
    transaction=True,
)


def chain(**overrides: Any) -> dict[str, Any]:
    """The claims of a well-formed two-hop token, with ``overrides`` applied (None deletes)."""
    claims: dict[str, Any] = {
        "act": {"sub": "broker-exec", "iss": ISSUER, "act": {"sub": "arr-oms", "iss": ARRANGER}},
        "prv": {
            "iss": ARRANGER,
            "jti": "t1",
            "prv": {"iss": ARRANGER, "jti": "t0"},
            "mandate": {"id": "mdt_1", "version": 1},
        },
        "origin": {"iss": ARRANGER, "sub": "alice"},
        "txn": "txn-1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


FINE = chain()
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "no act": (chain(act=None), "the act chain is not"),
    "one actor only": (chain(act={"sub": "broker-exec", "iss": ISSUER}), "the act chain is not"),
    "actors swapped": (
        chain(act={"sub": "x", "iss": ARRANGER, "act": {"sub": "y", "iss": ISSUER}}),
        "the act chain is not",
    ),
    "a hop nobody expected": (
        chain(act={**FINE["act"], "act": {**FINE["act"]["act"], "act": {"iss": "https://x"}}}),
        "the act chain is not",
    ),
    "an actor without iss": (
        chain(act={"sub": "broker-exec", "act": {"sub": "arr-oms", "iss": ARRANGER}}),
        "the act chain is not",
    ),
    "no provenance": (chain(prv=None), "the token does not derive from"),
    "provenance one level short": (
        chain(prv={"iss": ARRANGER, "jti": "t1", "mandate": {"id": "m", "version": 1}}),
        "the token does not derive from",
    ),
    "origin flattened": (chain(origin=None), "the origin is not"),
    "origin from elsewhere": (chain(origin={"iss": ISSUER, "sub": "alice"}), "the origin is not"),
    "no mandate": (
        chain(prv={k: v for k, v in FINE["prv"].items() if k != "mandate"}),
        "no mandate reference",
    ),
    "no txn": (chain(txn=None), "no transaction id"),
    "txn not a string": (chain(txn=7), "no transaction id"),
}


def test_a_well_formed_chain_is_accepted() -> None:
    assert RULE.problem(FINE) is None
    assert ChainRequirement().problem({}) is None  # nothing required, nothing refused
    own_mandate = chain(prv={"iss": ARRANGER, "jti": "t1", "prv": {"iss": ARRANGER}})
    assert RULE.problem({**own_mandate, "mandate": {"id": "mdt_1", "version": 1}}) is None


@pytest.mark.parametrize("case", list(CASES))
def test_each_shortfall_is_named(case: str) -> None:
    claims, expected = CASES[case]
    problem = RULE.problem(claims)
    assert problem is not None
    assert problem.startswith(expected)


def test_issuers_reads_nested_claims_outermost_first() -> None:
    assert issuers(FINE, "act") == [ISSUER, ARRANGER]
    assert issuers(FINE, "prv") == [ARRANGER, ARRANGER]
    deep: dict[str, Any] = {"iss": "i"}
    for _ in range(40):
        deep = {"iss": "i", "act": deep}
    assert len(issuers({"act": deep}, "act")) == 16  # bounded


@pytest.fixture
async def http(issuer: FakeIssuer) -> AsyncIterator[tuple[httpx.AsyncClient, CountingPdp]]:
    validator = TokenValidator(
        audience=AUDIENCE, issuers=[TrustedIssuer(ISSUER)], fetcher=issuer.fetcher()
    )
    pdp = CountingPdp(engine())
    pep = Pep(PolicyEnforcer(validator, pdp, realm="clearing", chain=RULE))
    app = FastAPI()
    pep.install(app)

    @app.post("/orders")
    async def create(
        grant: Grant = Depends(pep.require("order:create", resource=order_of, context=context_of)),
    ) -> dict[str, str]:
        return {"decision_id": grant.decision.decision_id}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://rs.test") as client:
        yield client, pdp


async def order(client: httpx.AsyncClient, token: str) -> httpx.Response:
    body = {"owner": "5493001KJTIIGC8Y1R12", "restricted": False, "amount_minor": 1000}
    return await client.post("/orders", json=body, headers={"Authorization": f"Bearer {token}"})


async def test_the_enforcer_refuses_a_chain_before_the_pdp(
    issuer: FakeIssuer, http: tuple[httpx.AsyncClient, CountingPdp]
) -> None:
    client, pdp = http
    accepted = await order(client, issuer.token(**FINE))
    refused = await order(client, issuer.token(**chain(origin=None)))

    assert accepted.status_code == 200, accepted.text
    assert refused.status_code == 403
    assert refused.json()["error"] == "insufficient_scope"
    assert (
        "chain of authority is not accepted: the origin is not"
        in (refused.json()["error_description"])
    )
    challenge = refused.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="clearing"')
    assert 'error="insufficient_scope"' in challenge
    assert pdp.asked == ["order:create"]  # the refused request never reached the PDP
