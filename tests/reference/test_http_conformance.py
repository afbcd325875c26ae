"""Bad input and the specs' MUSTs on the reference services' HTTP API (docs/settlement.md,
"Conformance and bad input"): every refusal is its exact status and problem type, never a 500,
and leaves nothing written; racing requests with one Idempotency-Key execute once (PostgreSQL);
the exceptions API's resolve steps each write a signed event (the ledger's entry)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.reference import test_http
from tests.reference.conftest import ORDER, SplitWorld, caller
from tests.reference.test_http import Harness
from trustplane.reference import store as store_module
from trustplane.reference.services import Refused

harness = test_http.harness  # the fixture: real tokens, the PEP, the SDK's idempotency keys

JSON = {"Content-Type": "application/json"}
NUL = "\u0000"


def code(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"] == "application/problem+json", response.text
    return response.status_code, str(response.json()["type"]).rsplit("/", 1)[1]


async def counts(h: Harness) -> tuple[int, int, int]:
    """Trades, transitions and outbox events: what a refusal must leave as it was."""
    found = []
    async with h.store.db.read() as conn:
        for table in ("ref_trades", "ref_transitions", "ref_outbox"):
            rows = select(func.count()).select_from(store_module.metadata.tables[table])
            found.append(int((await conn.execute(rows)).scalar_one()))
    return found[0], found[1], found[2]


async def created(h: Harness) -> str:
    answer = await h.client.post("/orders", json=ORDER, headers=h.headers(key="order"))
    assert answer.status_code == 201, answer.text
    return str(answer.json()["trade_id"])


BAD_ORDERS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("not JSON", b"{nope", JSON, 400, "invalid-request"),
    ("not UTF-8", b'{"side": "\xff"}', JSON, 400, "invalid-request"),
    ("an array", b"[1]", JSON, 400, "invalid-request"),
    ("quantity a list", b'{"quantity": [1]}', JSON, 400, "invalid-request"),
    ("side a number", b'{"side": 1}', JSON, 400, "invalid-request"),
    ("NUL in account", b'{"account": "A\\u0000B"}', JSON, 400, "invalid-request"),
    ("NUL in instrument", b'{"instrument": "I\\u0000"}', JSON, 400, "invalid-request"),
    ("NUL in a key", b'{"x\\u0000": 1}', JSON, 400, "invalid-request"),
    ("quantity 1E+1000000", b'{"quantity": "1E+1000000"}', JSON, 400, "invalid-request"),
    ("amount 1E+30", b'{"amount": "1E+30"}', JSON, 400, "invalid-request"),
    ("amount 1E-19", b'{"amount": "1E-19"}', JSON, 400, "invalid-request"),
    ("no content type", b"{}", {}, 415, "unsupported-media-type"),
    ("text/plain", b"{}", {"Content-Type": "text/plain"}, 415, "unsupported-media-type"),
    ("a form", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported-media-type"),
]  # fmt: skip


def order_body(raw: bytes) -> bytes:
    """``raw``'s members over a valid order (raw itself when it is not a JSON object)."""
    if not raw.startswith(b"{") or raw == b"{nope" or b"\xff" in raw or raw == b"{}":
        return raw
    import orjson

    return orjson.dumps({**ORDER, **orjson.loads(raw)})


@pytest.mark.parametrize("case", BAD_ORDERS, ids=[c[0] for c in BAD_ORDERS])
async def test_a_bad_order_is_refused_with_its_code_and_writes_nothing(
    harness: Harness, case: tuple[str, bytes, dict[str, str], int, str]
) -> None:
    h = harness
    _name, raw, headers, status, problem = case
    before = await counts(h)
    answer = await h.client.post(
        "/orders", content=order_body(raw), headers={**h.headers(key="k"), **headers}
    )
    assert code(answer) == (status, problem)
    assert await counts(h) == before


async def test_a_huge_body_is_413_before_it_is_read(harness: Harness) -> None:
    h = harness
    raw = b'{"account": "' + b"x" * (1 << 20) + b'"}'
    answer = await h.client.post("/orders", content=raw, headers={**h.headers(key="k"), **JSON})
    assert answer.status_code == 413
    assert await counts(h) == (0, 0, 0)


async def test_nul_in_a_step_s_body_is_400_on_every_route(harness: Harness) -> None:
    h = harness
    trade_id = await created(h)
    await h.client.post(f"/trades/{trade_id}/execute", headers=h.headers(key="e"))
    before = await counts(h)
    bodies = [
        ("allocation", {"allocations": [{"account": f"S{NUL}", "quantity": "1000"}]}),
        ("settlement", {"instructions": {"ssi": NUL}}),
        ("settlement/amend", {"instructions": {NUL: "x"}}),
        ("settlement/confirm", {"outcome": f"settled{NUL}"}),
    ]
    for i, (path, body) in enumerate(bodies):
        answer = await h.client.post(
            f"/trades/{trade_id}/{path}", json=body, headers=h.headers(key=f"n{i}")
        )
        assert code(answer) == (400, "invalid-request"), path
    resolve = await h.client.post(
        f"/exceptions/{trade_id}.1/resolve",
        json={"action": "escalate", "note": NUL},
        headers=h.headers(),
    )
    assert code(resolve) == (400, "invalid-request")
    assert await counts(h) == before


@pytest.mark.parametrize(
    "claims",
    [{"sub": f"a{NUL}"}, {"txn": f"t{NUL}"}, {"mandate": {"id": f"M{NUL}", "version": 1}}],
    ids=["sub", "txn", "mandate"],
)
async def test_a_token_whose_stored_claims_hold_nul_is_401(
    harness: Harness, claims: dict[str, Any]
) -> None:
    """A validly signed token, but the actor or envelope it would write cannot be stored
    (PostgreSQL): refused as the bearer token it is (RFC 6750 ``invalid_token``), not a 500."""
    h = harness
    fields = {"sub": "alice", "txn": "txn-9", "mandate": {"id": "M-1", "version": 1}} | claims
    token = h.issuer.token(scope=test_http.SCOPES, **fields)
    answer = await h.client.post(
        "/orders",
        json=ORDER,
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": '"t"'},
    )
    assert (answer.status_code, answer.json()["error"]) == (401, "invalid_token")
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert await counts(h) == (0, 0, 0)


async def test_an_allocation_too_large_to_add_up_is_400(harness: Harness) -> None:
    h = harness
    trade_id = await created(h)
    await h.client.post(f"/trades/{trade_id}/execute", headers=h.headers(key="e"))
    huge = {"allocations": [{"account": "S", "quantity": "1E+1000000"}]}
    answer = await h.client.post(
        f"/trades/{trade_id}/allocation", json=huge, headers=h.headers(key="p")
    )
    assert code(answer) == (400, "invalid-request")


UNKNOWN = ["nope", "x" * 300]


def entry_refused_nul(response: httpx.Response) -> bool:
    """A NUL in the request target is answered 400 at the entry (``trustplane.limits``), before
    any route or query runs."""
    return response.status_code == 400 and "NUL" in response.text


async def test_a_nul_in_the_target_is_refused_at_the_entry(harness: Harness) -> None:
    h = harness
    trade_id = await created(h)
    before = await counts(h)
    for path in ("/trades/a%00b/execute", "/trades/a%00b"):
        method = h.client.post if path.endswith("execute") else h.client.get
        answer = await method(path, headers=h.headers(key="nul"))
        assert entry_refused_nul(answer), answer.text
    events = await h.client.get("/events?after=%00", headers=h.headers())
    assert entry_refused_nul(events), events.text
    assert await counts(h) == before
    assert (await h.client.get(f"/trades/{trade_id}", headers=h.headers())).status_code == 200


@pytest.mark.parametrize("trade_id", UNKNOWN, ids=["unknown", "long"])
async def test_an_unknown_trade_is_404_on_every_route(harness: Harness, trade_id: str) -> None:
    h = harness
    steps: list[tuple[str, dict[str, Any] | None]] = [
        ("execute", None),
        ("allocation", {"allocations": [{"account": "S", "quantity": "1"}]}),
        ("allocation/approve", None),
        ("settlement", {"instructions": {"ssi": "X"}}),
        ("settlement/amend", {"instructions": {"ssi": "Y"}}),
        ("settlement/confirm", {"outcome": "settled"}),
    ]
    for i, (path, body) in enumerate(steps):
        answer = await h.client.post(
            f"/trades/{trade_id}/{path}", json=body, headers=h.headers(key=f"u{i}")
        )
        assert code(answer) == (404, "not-found"), path
    report = await h.client.get(f"/trades/{trade_id}", headers=h.headers())
    assert code(report) == (404, "not-found")
    resolve = await h.client.post(
        f"/exceptions/{trade_id}.1/resolve", json={"action": "cancel"}, headers=h.headers()
    )
    assert code(resolve) == (404, "not-found")
    assert await counts(h) == (0, 0, 0)


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        (b"{", JSON),
        (b"[]", JSON),
        (b'{"action": 5}', JSON),
        (b'{"action": "close"}', JSON),
        (b'{"action": "cancel", "note": 5}', JSON),
        (b'{"action": "cancel", "note": "' + b"x" * 1001 + b'"}', JSON),
        (b'{"action": "cancel"}', {"Content-Type": "text/plain"}),
    ],
    ids=["not JSON", "an array", "action 5", "action close", "note 5", "note long", "text"],
)
async def test_a_bad_resolve_body_is_refused(
    harness: Harness, raw: bytes, headers: dict[str, str]
) -> None:
    h = harness
    trade_id, exception_id = await exception_of(h, "r")
    before = await counts(h)
    answer = await h.client.post(
        f"/exceptions/{exception_id}/resolve", content=raw, headers={**h.headers(), **headers}
    )
    expected = 415 if headers is not JSON else 400
    assert code(answer)[0] == expected
    assert await counts(h) == before
    assert (await h.client.get(f"/trades/{trade_id}", headers=h.headers())).json()[
        "state"
    ] == "exception"


async def test_a_step_out_of_order_is_409_naming_the_state(harness: Harness) -> None:
    h = harness
    trade_id = await created(h)
    before = await counts(h)
    for i, (path, body, expected) in enumerate(
        [
            ("allocation/approve", None, "allocation_proposed"),
            ("settlement", {"instructions": {"ssi": "X"}}, "allocation_approved"),
            ("settlement/confirm", {"outcome": "failed"}, "settlement_submitted"),
        ]
    ):
        answer = await h.client.post(
            f"/trades/{trade_id}/{path}", json=body, headers=h.headers(key=f"o{i}")
        )
        assert code(answer) == (409, "out-of-order")
        assert answer.json()["state"] == "created"
        assert answer.json()["expected"] == expected
    assert await counts(h) == before


async def test_a_wrong_method_is_405_with_allow(harness: Harness) -> None:
    h = harness
    answer = await h.client.get("/orders", headers=h.headers())
    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"


@pytest.mark.parametrize(
    "query",
    [
        "after=abc",
        "after=-1",
        "after=1e3",
        "after=" + "9" * 19,  # beyond any cursor (and SQLite's and PostgreSQL's integers)
        "wait=nan",
        "wait=31",
        "wait=-1",
        "cursor=0",  # unknown parameter
    ],
)
async def test_a_bad_events_query_is_400_invalid_request(harness: Harness, query: str) -> None:
    h = harness
    await created(h)  # one event: seq 1
    answer = await h.client.get(f"/events?{query}", headers=h.headers())
    assert code(answer) == (400, "invalid-request")


async def test_the_last_cursor_given_out_resumes_one_past_it_is_400(harness: Harness) -> None:
    h = harness
    await created(h)
    first = (await h.client.get("/events", headers=h.headers())).json()
    assert first["next"] == first["events"][-1]["seq"]
    again = await h.client.get(f"/events?after={first['next']}", headers=h.headers())
    assert again.json() == {"events": [], "next": first["next"]}
    future = await h.client.get(f"/events?after={first['next'] + 1}", headers=h.headers())
    assert code(future) == (400, "invalid-request")


async def test_the_split_feed_refuses_a_cursor_past_its_last_event(split: SplitWorld) -> None:
    """One store per service: ``GET /events`` is the reporting store's feed, its own cursor."""
    s = split.services
    trade = await s.create_order(caller("alice", split.pdp), ORDER, "k")
    feed = await s.events(0, 0)
    assert [e.trade_id for e in feed] == [trade.trade_id]
    assert await s.events(feed[-1].seq, 0) == []
    with pytest.raises(Refused) as refused:
        await s.events(feed[-1].seq + 1, 0)
    assert (refused.value.status, refused.value.code) == (400, "invalid-request")


async def test_racing_requests_with_one_key_execute_once(harness: Harness) -> None:
    """Draft §2.6: the same key while the first is in progress is 409, or (our stores keep the
    key in the transition's own transaction) the first's answer; never a second execution
    (PostgreSQL: concurrent transactions; SQLite: its one writer)."""
    h = harness
    orders = await asyncio.gather(
        *(h.client.post("/orders", json=ORDER, headers=h.headers(key="same")) for _ in range(8))
    )
    assert {a.status_code for a in orders} <= {201, 409}, [a.text for a in orders]
    ids = {a.json()["trade_id"] for a in orders if a.status_code == 201}
    assert len(ids) == 1
    for answer in orders:
        if answer.status_code == 409:
            assert answer.json()["title"].startswith("A request is outstanding")
    trade_id = ids.pop()
    steps = await asyncio.gather(
        *(
            h.client.post(f"/trades/{trade_id}/execute", headers=h.headers(key="x"))
            for _ in range(8)
        )
    )
    done = [a.json() for a in steps if a.status_code == 200]
    assert done, [a.text for a in steps]
    assert all(d == done[0] for d in done)
    assert {a.status_code for a in steps} <= {200, 409}
    assert await counts(h) == (1, 2, 2)  # one order, one execution, their two events


async def exception_of(h: Harness, key: str) -> tuple[str, str]:
    """A trade refused at settlement (mandate revoked): its id and its open exception's."""
    answer = await h.client.post("/orders", json=ORDER, headers=h.headers(key=f"{key}-o"))
    trade_id = answer.json()["trade_id"]
    alloc = {"allocations": [{"account": "S", "quantity": "1000"}]}
    for path, body, sub in (
        ("execute", None, "broker"),
        ("allocation", alloc, "alice"),
        ("allocation/approve", None, "bob"),
    ):
        moved = await h.client.post(
            f"/trades/{trade_id}/{path}", json=body, headers=h.headers(sub, key=f"{key}-{path}")
        )
        assert moved.status_code == 200, moved.text
    h.mandates.revoked.add("M-1")
    refused = await h.client.post(
        f"/trades/{trade_id}/settlement",
        json={"instructions": {"ssi": "X"}},
        headers=h.headers("clearing", key=f"{key}-s"),
    )
    h.mandates.revoked.clear()
    assert code(refused) == (403, "settlement-exception")
    return trade_id, str(refused.json()["exception"]["exception_id"])


async def test_every_resolve_step_is_an_audited_event_and_a_second_resolve_is_409(
    harness: Harness,
) -> None:
    h = harness
    one, first = await exception_of(h, "a")
    two, second = await exception_of(h, "b")
    cursor = (await h.client.get("/events", headers=h.headers())).json()["next"]
    for exception_id, action in ((first, "escalate"), (first, "cancel"), (second, "reconsent")):
        answer = await h.client.post(
            f"/exceptions/{exception_id}/resolve",
            json={"action": action, "note": f"by ops: {action}"},
            headers=h.headers("ops"),
        )
        assert answer.status_code == 200, answer.text
    events = (await h.client.get(f"/events?after={cursor}", headers=h.headers())).json()["events"]
    assert [e["type"] for e in events] == [
        "exception.escalated",
        "exception.resolved",
        "exception.resolved",
    ]
    report = (await h.client.get(f"/trades/{one}", headers=h.headers())).json()
    assert [t["transition"] for t in report["transitions"]][-1] == "cancel"
    assert report["transitions"][-1]["actor"] == "ops"
    before = await counts(h)
    for exception_id, action in ((first, "reconsent"), (second, "cancel"), (first, "escalate")):
        again = await h.client.post(
            f"/exceptions/{exception_id}/resolve", json={"action": action}, headers=h.headers()
        )
        assert again.status_code == 409, (action, again.text)
        assert code(again)[1] in ("already-resolved", "duplicate-transition")
    assert await counts(h) == before
    assert (await h.client.get(f"/trades/{two}", headers=h.headers())).json()[
        "state"
    ] == "allocation_approved"


async def test_racing_resolutions_of_one_exception_one_wins_the_other_409(
    harness: Harness,
) -> None:
    """``reconsent`` and ``cancel`` of one exception, racing over HTTP (PostgreSQL: concurrent
    transactions): one resolves it, the other is 409 naming what happened; one event."""
    h = harness
    trade_id, exception_id = await exception_of(h, "race")
    cursor = (await h.client.get("/events", headers=h.headers())).json()["next"]
    answers = await asyncio.gather(
        *(
            h.client.post(
                f"/exceptions/{exception_id}/resolve",
                json={"action": action},
                headers=h.headers(f"ops-{i}"),
            )
            for i, action in enumerate(("reconsent", "cancel") * 3)
        )
    )
    assert sorted(a.status_code for a in answers) == [200] + [409] * 5, [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 409:
            assert code(answer)[1] in ("already-resolved", "duplicate-transition", "out-of-order")
    events = (await h.client.get(f"/events?after={cursor}", headers=h.headers())).json()["events"]
    assert [e["type"] for e in events] == ["exception.resolved"]
    state = (await h.client.get(f"/trades/{trade_id}", headers=h.headers())).json()["state"]
    assert state in ("allocation_approved", "cancelled")


ROUTING: list[tuple[str, str, int, str, str | None]] = [
    ("GET", "/nope", 404, "not-found", None),
    ("POST", "/trades/t1/nope", 404, "not-found", None),
    ("GET", "/orders", 405, "method-not-allowed", "POST"),
    ("DELETE", "/trades/t1/execute", 405, "method-not-allowed", "POST"),
    ("POST", "/jwks", 405, "method-not-allowed", "GET"),
    ("PUT", "/exceptions", 405, "method-not-allowed", "GET"),
]  # fmt: skip


@pytest.mark.parametrize("case", ROUTING, ids=[f"{c[0]} {c[1]}" for c in ROUTING])
async def test_an_unknown_path_or_method_is_a_problem_like_every_other_refusal(
    harness: Harness, case: tuple[str, str, int, str, str | None]
) -> None:
    """FastAPI's defaults (``{"detail": "Not Found"}``, ``{"detail": "Method Not Allowed"}``)
    were the only refusals of the API not in its RFC 9457 shape."""
    method, path, status, problem_type, allow = case
    answer = await harness.client.request(method, path, headers=harness.headers())
    assert code(answer) == (status, problem_type), answer.text
    assert answer.json()["status"] == status
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers.get("allow") == allow


async def test_an_unreadable_parameter_is_invalid_request_not_fastapis_422(
    harness: Harness,
) -> None:
    """A route that lets FastAPI read a typed parameter (as ``build_app``'s users may add, the
    bench adds ``/healthz``) answers a bad one in the API's shape too."""
    app = harness.client._transport.app  # type: ignore[attr-defined]

    @app.get("/typed")
    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    answer = await harness.client.get("/typed", params={"n": "x"})
    assert code(answer) == (400, "invalid-request"), answer.text
    assert "n" in answer.json()["detail"]
