"""The AuthZEN wire parser's fast path (``_parsed_request``) against the checked one
(``_checked_request``, the one that names the faulty field): for every input the fast path accepts,
both give the same request; everything else is left to the checked path (and answered as its 400)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.policy.test_authzen_fuzz import json_values, valid
from trustplane.authzen import wire
from trustplane.authzen.model import Entity
from trustplane.errors import InvalidRequestError

FIELDS = ["subject", "action", "resource", "context", "transaction_id"]


def checked(raw: dict[str, Any]) -> Any:
    try:
        return wire._checked_request(raw, "", "corr")
    except InvalidRequestError as exc:
        return exc


def fast(raw: dict[str, Any]) -> Any:
    try:
        return wire._parsed_request(raw, "corr")
    except wire._Malformed:
        return None


def test_a_well_formed_request_takes_the_fast_path() -> None:
    body = {**valid(), "transaction_id": "txn-1"}

    request = fast(body)

    assert request is not None
    assert request == checked(body)
    assert request.subject.parents == (
        Entity("LegalEntity", valid()["subject"]["parents"][0]["id"]),
    )
    assert request.resource.attributes["account"] == Entity("Account", "A", {})


LIMITS: list[tuple[str, Any]] = [
    ("an id at the length limit", {"type": "Client", "id": "x" * wire.MAX_ID_LENGTH}),
    ("an id over the length limit", {"type": "Client", "id": "x" * (wire.MAX_ID_LENGTH + 1)}),
    ("parents at the limit", {"type": "C", "id": "c", "parents": [{"type": "L", "id": "l"}] * 16}),
    (
        "parents over the limit",
        {"type": "C", "id": "c", "parents": [{"type": "L", "id": "l"}] * 17},
    ),
    ("an empty type", {"type": "", "id": "c"}),
    ("a number id", {"type": "C", "id": 7}),
    ("properties a list", {"type": "C", "id": "c", "properties": []}),
]


@pytest.mark.parametrize("subject", [case[1] for case in LIMITS], ids=[c[0] for c in LIMITS])
def test_limits_are_the_same_on_both_paths(subject: Any) -> None:
    body = {**valid(), "subject": subject}

    expected, got = checked(body), fast(body)

    if isinstance(expected, InvalidRequestError):
        assert got is None
    else:
        assert got == expected


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("depth", [wire.MAX_DEPTH - 1, wire.MAX_DEPTH, wire.MAX_DEPTH + 1, 40])
def test_nesting_depth_is_the_same_on_both_paths(depth: int) -> None:
    body = {**valid(), "context": {"x": nested(depth)}}

    expected, got = checked(body), fast(body)

    assert got is None if isinstance(expected, InvalidRequestError) else got == expected


def test_a_context_that_is_an_entity_reference_is_a_400() -> None:
    body = {**valid(), "context": {"__entity": {"type": "A", "id": "b"}}}

    with pytest.raises(InvalidRequestError, match="context must be a JSON object of attributes"):
        wire.request_from_json(body, "", None)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.booleans())
def test_the_fast_path_agrees_with_the_checked_path(field: str, value: Any, drop: bool) -> None:
    body = valid()
    if drop:
        body.pop(field, None)
    else:
        body[field] = value

    expected, got = checked(body), fast(body)

    if got is not None:  # accepted by the fast path: the same request the checked path builds
        assert got == expected
    answer = _answer(body)
    assert answer == expected if not isinstance(expected, Exception) else isinstance(answer, str)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(["subject", "resource"]), key=st.text(max_size=8), value=json_values)
def test_entity_members_agree(path: str, key: str, value: Any) -> None:
    body = valid()
    body[path] = {**body[path], key: value}
    body[path].setdefault("properties", {})["p"] = value

    expected, got = checked(body), fast(body)

    if got is not None:
        assert got == expected
    else:
        assert isinstance(_answer(body), str) or _answer(body) == expected


def _answer(body: dict[str, Any]) -> Any:
    """What the public parser gives: the request, or the 400's description."""
    try:
        return wire.request_from_json(body, "", "corr")
    except InvalidRequestError as exc:
        return exc.description


def test_a_request_survives_the_round_trip_through_json() -> None:
    owner = Entity("LegalEntity", "L1")
    account = Entity("Account", "A1", {"owner": owner, "tags": ["a", "b"]}, (owner,))
    context = {
        "amount_minor": 5,
        "nested": {"list": [1, "x", {"deep": owner}], "flag": True, "none": None},
        "entities": [owner, account],
    }
    request = wire.DecisionRequest(
        Entity("Client", "c", {"legal_entity": owner, "scopes": ["order:create"]}, (owner,)),
        "order:create",
        Entity("Order", "O", {"account": account, "ratio": 0.5}),
        context,
        None,
        "txn-9",
    )

    back = wire.request_from_json(wire.request_to_json(request), "", None)

    assert back.context == context
    assert back.resource == request.resource
    assert back.subject == request.subject
    assert back.transaction_id == "txn-9"
