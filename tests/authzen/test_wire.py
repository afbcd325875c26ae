"""The AuthZEN wire parser's fast path (``_parsed_request``) against the checked one
(``_checked_request``, the one that names the faulty field): for every input the fast path accepts,
both give the same request; everything else is left to the checked path (and answered as its 400)."""

from __future__ import annotations

import json
from typing import Any

import orjson
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
    ("a subject id at its limit", {"type": "Client", "id": "x" * wire.MAX_SUBJECT_PART}),
    ("a subject id over its limit", {"type": "Client", "id": "x" * (wire.MAX_SUBJECT_PART + 1)}),
    ("a subject type over its limit", {"type": "C" * (wire.MAX_SUBJECT_PART + 1), "id": "c"}),
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


# --------------------------------------------------------------------------- repeated member names

_NAMES = st.sampled_from(["a", "b", "id", 'q"', "c:", "\\", "\u00e9"])
_SPACE = st.sampled_from(["", " ", "\n\t "])


def _scalar_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


json_texts = st.recursive(
    st.one_of(st.integers(), st.booleans(), st.none(), _NAMES).map(_scalar_text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(_NAMES, _SPACE, inner), max_size=4).map(
            lambda members: (
                "{"
                + ",".join(f"{json.dumps(k)}{space}:{space}{v}" for k, space, v in members)
                + "}"
            )
        ),
    ),
    max_leaves=20,
)


def _repeats(raw: str) -> bool:
    """The reference: the standard library's parser sees every member of every object."""
    found = False

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        names = [name for name, _ in members]
        found = found or len(set(names)) != len(names)
        return dict(members)

    json.loads(raw, object_pairs_hook=pairs)
    return found


@settings(max_examples=500, deadline=None)
@given(raw=json_texts)
def test_a_repeated_member_name_is_found_exactly(raw: str) -> None:
    """``repeats_a_member_name`` (§11.5) against the standard library's view of the same text:
    names holding quotes, colons, backslashes and non-ASCII, spaces around the colon."""
    data = raw.encode()

    assert wire.repeats_a_member_name(data, orjson.loads(data)) is _repeats(raw)
