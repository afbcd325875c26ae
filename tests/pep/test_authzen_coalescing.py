"""AuthzenClient coalescing: decisions asked while a request to the PDP is in flight go together in the
next ``/evaluations`` request; each caller gets its own answer; a failed batch fails every waiter
closed; a cancelled caller disturbs nobody. The PDP here holds each request until the test releases
it, so which decisions share a request is decided by the test, not by timing."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from trustplane.authzen.model import Decision, DecisionRequest, Entity
from trustplane.pep import AuthzenClient, ClientSecretBasic, OutboundFetcher
from trustplane.pep.authzen import MAX_BATCH

PDP = "https://pdp.example"
SUBJECT = Entity("Client", "c-1")


@dataclass
class HeldPdp:
    """Answers each evaluation from its resource id (``allow-*`` allows, anything else denies) with
    its correlation id as the decision id; ``broken`` maps a request's number (0 = the first) to a
    failure: an HTTP status, or an exception the transport raises."""

    broken: dict[int, int | Exception] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    answered: int = 0
    tokens: int = 0
    arrivals: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    releases: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            self.tokens += 1
            await asyncio.sleep(0)  # requests side by side would each ask here
            return httpx.Response(200, json={"access_token": "tok", "expires_in": 300})
        number = len(self.requests)
        self.requests.append(request)
        self.arrivals.put_nowait(number)
        await self.releases.acquire()
        self.answered += 1
        failure = self.broken.get(number)
        if isinstance(failure, Exception):
            raise failure
        if failure is not None:
            return httpx.Response(failure, json={"error": "server_error"})
        body = json.loads(request.content)
        request_id = request.headers.get("x-request-id")
        if request.url.path.endswith("/evaluations"):
            answers = [_answer(e, request_id) for e in body["evaluations"]]
            return httpx.Response(200, json={"evaluations": answers})
        return httpx.Response(200, json=_answer(body, request_id))

    def client(self, max_in_flight: int | None = 1) -> AuthzenClient:
        """One request in flight unless told (None: the client's default): what queues is then
        decided by one held request."""
        limit = {} if max_in_flight is None else {"max_in_flight": max_in_flight}
        return AuthzenClient(
            PDP,
            token_endpoint=f"{PDP}/token",
            auth=ClientSecretBasic("rs", "secret"),
            fetcher=OutboundFetcher(transport=httpx.MockTransport(self.handler)),
            **limit,
        )

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.releases.release()

    def sent(self, number: int) -> list[str]:
        """The correlation ids of request ``number``'s evaluations."""
        body = json.loads(self.requests[number].content)
        return [e.get("correlation_id") for e in body.get("evaluations", [body])]


def _answer(evaluation: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    """The evaluation's own correlation id, else the request's, is the decision id."""
    allowed = evaluation["resource"]["id"].startswith("allow")
    decision_id = evaluation.get("correlation_id", request_id)
    context = {"decision_id": decision_id, "reason_ids": ["r"]}
    return {"decision": allowed, "context": {**context, "bundle_version": "v1"}}


def ask(client: AuthzenClient, name: str) -> asyncio.Task[Decision]:
    """A caller: resource ``name`` (``allow-*`` or ``deny-*``), correlation id ``id-<name>``."""
    resource = Entity("Order", name)
    return asyncio.create_task(
        client.decide(SUBJECT, "order:create", resource, {}, correlation_id=f"id-{name}")
    )


async def first_in_flight(pdp: HeldPdp, client: AuthzenClient, name: str) -> asyncio.Task[Decision]:
    """A caller whose request has reached the PDP and is held there."""
    task = ask(client, name)
    assert await pdp.arrivals.get() == 0
    return task


async def queued(client: AuthzenClient, names: list[str]) -> list[asyncio.Task[Decision]]:
    """Callers that have asked (and wait: one request is in flight)."""
    tasks = [ask(client, name) for name in names]
    await asyncio.sleep(0)  # each new task runs to its first wait: the answer
    return tasks


async def test_concurrent_decisions_share_one_request_and_each_gets_its_own_answer() -> None:
    pdp = HeldPdp()
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    waiting = await queued(client, ["deny-1", "allow-2", "deny-3", "allow-4"])

    pdp.release(2)
    decisions = await asyncio.gather(first, *waiting)

    assert [r.url.path for r in pdp.requests] == ["/access/v1/evaluation", "/access/v1/evaluations"]
    assert pdp.sent(1) == ["id-deny-1", "id-allow-2", "id-deny-3", "id-allow-4"]
    assert [(d.allowed, d.decision_id) for d in decisions] == [
        (True, "id-allow-0"),
        (False, "id-deny-1"),
        (True, "id-allow-2"),
        (False, "id-deny-3"),
        (True, "id-allow-4"),
    ]


async def test_by_default_two_requests_go_side_by_side_and_the_third_decision_queues() -> None:
    """The default limit, 2: a pair of overlapping decisions is not serialised (each alone, at once);
    decisions asked while two are in flight go together in the next request."""
    pdp = HeldPdp()
    client = pdp.client(max_in_flight=None)
    first, second = ask(client, "allow-0"), ask(client, "deny-1")
    assert {await pdp.arrivals.get(), await pdp.arrivals.get()} == {0, 1}
    waiting = await queued(client, ["allow-2", "deny-3", "allow-4"])
    assert len(pdp.requests) == 2  # the third, fourth and fifth wait
    assert pdp.tokens == 1  # the pair fetched one access token, not one each

    pdp.release(3)
    decisions = await asyncio.gather(first, second, *waiting)

    paths = [r.url.path for r in pdp.requests]
    assert paths == ["/access/v1/evaluation"] * 2 + ["/access/v1/evaluations"]
    assert pdp.sent(2) == ["id-allow-2", "id-deny-3", "id-allow-4"]
    assert [(d.allowed, d.decision_id) for d in decisions] == [
        (True, "id-allow-0"),
        (False, "id-deny-1"),
        (True, "id-allow-2"),
        (False, "id-deny-3"),
        (True, "id-allow-4"),
    ]


def test_max_in_flight_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match=r"^max_in_flight must be at least 1$"):
        HeldPdp().client(max_in_flight=0)


async def test_a_lone_decision_goes_alone_with_its_request_id() -> None:
    pdp = HeldPdp()
    pdp.release()

    decision = await pdp.client().decide(
        SUBJECT, "order:create", Entity("Order", "allow-1"), {}, correlation_id="r-1"
    )

    assert decision.allowed
    (request,) = pdp.requests
    assert request.url.path == "/access/v1/evaluation"
    assert request.headers["x-request-id"] == "r-1"
    assert json.loads(request.content)["correlation_id"] == "r-1"


async def test_a_batch_names_each_evaluation_and_no_shared_request_id() -> None:
    pdp = HeldPdp()
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    waiting = await queued(client, ["allow-1", "allow-2"])

    pdp.release(2)
    await asyncio.gather(first, *waiting)

    batch = pdp.requests[1]
    assert "x-request-id" not in batch.headers  # it would name the other evaluations too
    assert batch.headers["authorization"] == "Bearer tok"
    assert pdp.sent(1) == ["id-allow-1", "id-allow-2"]


async def test_batches_are_bounded() -> None:
    pdp = HeldPdp()
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    waiting = await queued(client, [f"allow-{i}" for i in range(1, MAX_BATCH + 9)])

    pdp.release(3)
    decisions = await asyncio.gather(first, *waiting)

    assert [len(pdp.sent(n)) for n in range(len(pdp.requests))] == [1, MAX_BATCH, 8]
    assert [d.decision_id for d in decisions] == [f"id-allow-{i}" for i in range(MAX_BATCH + 9)]


@pytest.mark.parametrize(
    "failure",
    [500, httpx.ConnectError("refused"), httpx.ReadTimeout("slow")],
    ids=["500", "connection refused", "timeout"],
)
async def test_a_failed_batch_fails_every_waiter_closed(failure: int | Exception) -> None:
    pdp = HeldPdp(broken={1: failure})
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    waiting = await queued(client, ["allow-1", "deny-2", "allow-3"])

    pdp.release(2)
    decisions = await asyncio.gather(*waiting)

    assert (await first).allowed
    assert [d.reason_ids for d in decisions] == [("pdp_unreachable",)] * 3
    assert not any(d.allowed for d in decisions)
    assert len({d.decision_id for d in decisions}) == 3


async def test_an_unexpected_error_is_a_deny_and_the_queue_is_still_served() -> None:
    pdp = HeldPdp(broken={0: RuntimeError("a bug")})
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    waiting = await queued(client, ["allow-1", "deny-2"])

    pdp.release(2)
    failed = await first  # no exception reaches the caller
    decisions = await asyncio.gather(*waiting)

    assert failed.reason_ids == ("pdp_unreachable",)
    assert [(d.allowed, d.decision_id) for d in decisions] == [
        (True, "id-allow-1"),
        (False, "id-deny-2"),
    ]


async def test_a_caller_cancelled_while_queued_is_not_sent() -> None:
    pdp = HeldPdp()
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    one, gone, three = await queued(client, ["allow-1", "allow-2", "deny-3"])

    gone.cancel()
    pdp.release(2)

    assert [d.decision_id for d in await asyncio.gather(first, one, three)] == [
        "id-allow-0",
        "id-allow-1",
        "id-deny-3",
    ]
    assert gone.cancelled()
    assert pdp.sent(1) == ["id-allow-1", "id-deny-3"]


async def test_a_cancelled_caller_does_not_cancel_the_batch_it_is_in() -> None:
    pdp = HeldPdp()
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    one, gone, three = await queued(client, ["allow-1", "allow-2", "deny-3"])
    pdp.release()
    await first
    assert await pdp.arrivals.get() == 1  # the batch of three is held at the PDP

    gone.cancel()
    pdp.release()

    assert [d.decision_id for d in await asyncio.gather(one, three)] == ["id-allow-1", "id-deny-3"]
    assert gone.cancelled()
    assert pdp.answered == 2  # the batch's request ran to its answer
    assert len(pdp.requests) == 2


async def test_a_cancelled_first_caller_leaves_the_queue_served() -> None:
    pdp = HeldPdp()
    client = pdp.client()
    first = await first_in_flight(pdp, client, "allow-0")
    waiting = await queued(client, ["allow-1", "deny-2"])

    first.cancel()  # its own request (it shares it with nobody) ends with it
    pdp.release(2)

    assert [d.allowed for d in await asyncio.gather(*waiting)] == [True, False]
    assert first.cancelled()
    assert pdp.sent(1) == ["id-allow-1", "id-deny-2"]  # one batch, sent when the first ended


async def test_the_callers_own_batch_keeps_each_correlation_id() -> None:
    pdp = HeldPdp()
    pdp.release()
    requests = [
        DecisionRequest(SUBJECT, "order:create", Entity("Order", n), {}, f"id-{n}")
        for n in ("allow-1", "deny-2")
    ]

    decisions = await pdp.client().decide_many(requests)

    assert [d.decision_id for d in decisions] == ["id-allow-1", "id-deny-2"]
    assert "x-request-id" not in pdp.requests[0].headers


async def test_a_long_correlation_id_is_cut_to_what_the_pdp_accepts() -> None:
    pdp = HeldPdp()
    pdp.release()

    await pdp.client().decide(
        SUBJECT, "order:create", Entity("Order", "allow-1"), {}, correlation_id="x" * 300
    )

    assert json.loads(pdp.requests[0].content)["correlation_id"] == "x" * 256
