"""No body makes the AuthZEN endpoints answer anything but a decision (200) or a JSON 400.

schemathesis (tests/test_fuzz.py) reaches these routes without credentials, so it sees the 401 path;
here every request carries a valid ``decision:evaluate`` token, so the parsing and the decision point
behind it are what gets fuzzed: random JSON, and near-valid requests with fields dropped or replaced.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import LEI, register_kit
from trustplane.app import Services

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["\x00", "Client", "LegalEntity", LEI, "order:create", "__entity"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "id", "properties", "parents", "__entity", "name"])
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def valid() -> dict[str, Any]:
    le = {"type": "LegalEntity", "id": LEI}
    return {
        "subject": {
            "type": "Client",
            "id": "c-1",
            "properties": {"legal_entity": {"__entity": le}, "scopes": ["order:create"]},
            "parents": [le],
        },
        "action": {"name": "order:create"},
        "resource": {
            "type": "Order",
            "id": "O-1",
            "properties": {
                "owner": {"__entity": le},
                "account": {"__entity": {"type": "Account", "id": "A", "properties": {}}},
                "instrument": {"__entity": {"type": "Instrument", "id": "I"}},
            },
        },
        "context": {"data_region": "eu", "delegation_depth": 0, "amount_minor": 1},
    }


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = valid()
    for key in list(body):
        choice = draw(st.sampled_from(["keep", "keep", "drop", "random"]))
        if choice == "drop":
            del body[key]
        elif choice == "random":
            body[key] = draw(json_values)
    if draw(st.booleans()):
        body["evaluations"] = draw(st.lists(json_values | st.just(valid()), max_size=4))
        body["options"] = draw(
            st.sampled_from([None, {"evaluations_semantic": "deny_on_first_deny"}]) | json_values
        )
    return body


bodies = near_valid() | json_values | st.binary(max_size=100)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, path=st.sampled_from(["evaluation", "evaluations"]))
async def test_any_body_is_a_decision_or_a_400(
    http: httpx.AsyncClient, services: Services, body: Any, path: str
) -> None:
    token = await _token(http, services)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    response = await http.post(
        f"/access/v1/{path}",
        content=content,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )

    assert response.status_code in (200, 400), response.text
    answer = response.json()
    if response.status_code == 400:
        assert answer["error"] == "invalid_request"
        assert isinstance(answer["error_description"], str)
    else:
        decisions = answer.get("evaluations", [answer])
        assert all(isinstance(d["decision"], bool) for d in decisions)
    event(f"{path} {response.status_code}")


_TOKENS: dict[str, str] = {}


async def _token(http: httpx.AsyncClient, services: Services) -> str:
    """One caller per services instance (the fixture is per test; hypothesis reuses it)."""
    key = str(id(services))
    if key not in _TOKENS:
        audience = f"{services.settings.issuer}/access/v1"
        kit = await register_kit(services, scope="decision:evaluate", allowed_resources=[audience])
        form = {
            "grant_type": "client_credentials",
            "scope": "decision:evaluate",
            "resource": audience,
            **kit.auth(),
        }
        response = await http.post("/token", data=form)
        assert response.status_code == 200, response.text
        _TOKENS[key] = response.json()["access_token"]
    return _TOKENS[key]
