"""The remote PDP client a PEP uses: OpenID AuthZEN Authorization API 1.0 over HTTP. The wire format
(JSON <-> ``Entity``/``Decision``) is :mod:`trustplane.authzen.wire`, shared with the HTTP PDP."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from trustplane.authzen.model import Decision, DecisionRequest, Entity, FailReason
from trustplane.authzen.wire import MAX_CORRELATION_ID, decision_from_json, request_to_json
from trustplane.outbound import OutboundError, OutboundFetcher, OutboundPolicy
from trustplane.pep import metrics
from trustplane.pep.client_auth import ClientAuth
from trustplane.pep.keys import check_url
from trustplane.tracing.spans import inject_headers

log = structlog.get_logger("trustplane.pep")
#: A batch answer of MAX_EVALUATIONS decisions is far below this.
MAX_ANSWER_BYTES = 256 * 1024
#: Concurrent decisions sent together in one ``/evaluations`` request: at most this many, and at most
#: this many bytes of evaluations (the PDP refuses bodies over 256 KiB; the rest wait for the next).
MAX_BATCH = 32
MAX_BATCH_BYTES = 128 * 1024


@dataclass(slots=True)
class _Waiter:
    """One queued decision: its evaluation's JSON, its correlation id, the W3C trace headers of the
    caller's span (a batch carries its first waiter's), the caller's answer."""

    evaluation: bytes
    correlation_id: str | None
    trace: dict[str, str]
    answer: asyncio.Future[Decision]


# --------------------------------------------------------------------------- remote client


class AuthzenClient:
    """A :class:`~trustplane.authzen.model.DecisionPoint` that asks a remote AuthZEN PDP over HTTP.

    It authenticates with an access token for the PDP's audience, obtained by client credentials at
    ``token_endpoint`` (scope ``decision:evaluate``) and reused until shortly before it expires.
    Like every decision point it never raises: a PDP that cannot be reached, or answers anything but a
    decision, gives a deny with reason ``pdp_unreachable`` (fail closed) and increments
    ``trustplane_pep_pdp_unavailable_total``. Decisions are recorded by the PDP, not here.

    Concurrent :meth:`decide` calls are coalesced: up to ``max_in_flight`` requests to the PDP are in
    flight at a time, each decision asked then going at once, alone, to ``/evaluation``; the
    decisions asked while that many are in flight go together in the next request, an AuthZEN
    ``/evaluations`` batch of at most ``MAX_BATCH``. (With one in flight, two decisions that overlap
    would be sent one after the other, each alone, for no saving: the default, 2, lets a pair go
    side by side, and batches form from the third.) Each evaluation carries its own ``correlation_id`` member, so the PDP records
    every decision under its caller's id. A lone decision is sent by its caller; batches are sent by
    a task of the client, so a queued caller that is cancelled only gives up its answer (or its place
    in the queue), never the others' request.
    """

    def __init__(
        self,
        pdp: str,
        *,
        token_endpoint: str,
        auth: ClientAuth,
        audience: str | None = None,
        scope: str = "decision:evaluate",
        fetcher: OutboundFetcher | None = None,
        timeout: float = 2.0,
        max_in_flight: int = 2,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._own_fetcher = fetcher is None
        policy = OutboundPolicy(read_timeout=timeout, total_timeout=2 * timeout)
        self._fetcher = fetcher or OutboundFetcher(policy)
        self.pdp = check_url(pdp.rstrip("/"), "PDP URL", self._fetcher)
        self._token_endpoint = check_url(token_endpoint, "token endpoint", self._fetcher)
        self._auth, self._scope = auth, scope
        self._audience = audience or f"{self.pdp}/access/v1"
        self._token: tuple[str, float] | None = None
        self._token_lock: tuple[asyncio.AbstractEventLoop | None, asyncio.Lock] = (
            None,
            asyncio.Lock(),
        )
        self._queue: deque[_Waiter] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._max_in_flight = max_in_flight
        #: Requests in flight on the event loop ``_loop``. Counted per loop, so that a loop that ended
        #: mid-request leaves no client waiting for ever on the next one.
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def decide(
        self,
        subject: Entity,
        action: str,
        resource: Entity,
        context: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        transaction_id: str | None = None,
    ) -> Decision:
        request = DecisionRequest(
            subject, action, resource, context, correlation_id, transaction_id
        )
        evaluation, trace = _evaluation(request), _trace()
        loop = asyncio.get_running_loop()
        if (
            self._loop is not loop
        ):  # first use, or the earlier loop ended: nothing is in flight here
            self._loop, self._in_flight, self._sender = loop, 0, None
        if self._in_flight >= self._max_in_flight:  # this decision goes with the next request
            answer: asyncio.Future[Decision] = loop.create_future()
            self._queue.append(_Waiter(evaluation, correlation_id, trace, answer))
            return await answer
        return await self._alone(loop, evaluation, correlation_id, trace)

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        """The caller's own batch, sent as it is (not merged with coalesced decisions)."""
        if not requests:
            return []
        evaluations = [_evaluation(r) for r in requests]
        return await self._ask_many(evaluations, [r.correlation_id for r in requests], _trace())

    # ----------------------------------------------------------------------- coalescing

    async def _alone(
        self,
        loop: asyncio.AbstractEventLoop,
        evaluation: bytes,
        correlation_id: str | None,
        trace: dict[str, str],
    ) -> Decision:
        """Fewer than ``max_in_flight`` in flight: the caller sends its own request at once, in its
        own task (no task to start, no hand-over). Decisions asked while the limit is reached queue;
        when this one is answered, or its caller cancelled, a sender task takes the queue."""
        self._in_flight += 1
        try:
            return await self._ask_one(evaluation, correlation_id, trace)
        except Exception as exc:  # _ask_one fails closed itself; this is a last guard
            log.exception("pdp_request_failed")
            return self._unreachable(repr(exc))
        finally:
            if self._loop is loop:
                self._in_flight -= 1
                if self._queue and self._sender is None:
                    self._start_sender()

    async def _send_queued(self) -> None:
        """Send the queue, one request at a time, until it is empty. Every waiter taken gets an
        answer, a fail-closed deny if anything at all goes wrong (this task cancelled included)."""
        batch: list[_Waiter] = []
        try:
            while self._queue:
                batch = self._take()
                if batch:
                    self._in_flight += 1
                    try:
                        decisions = await self._ask_queued(batch)
                    finally:
                        self._in_flight -= 1
                    _answer(batch, decisions)
                    batch = []
                if not self._queue:  # the callers just answered may ask again at once: one
                    await asyncio.sleep(0)  # turn of the loop lets them join the next batch
        except BaseException as exc:
            _answer(batch, [self._unreachable(repr(exc)) for _ in batch])
            if not isinstance(exc, Exception):
                waiting = list(self._queue)  # cancelled: nobody would send these any more
                self._queue.clear()
                _answer(waiting, [self._unreachable(repr(exc)) for _ in waiting])
                raise
            log.exception("pdp_request_failed")
        finally:
            self._sender = None
            if self._queue:  # only after an unexpected error: the queue is served by a new task
                self._start_sender()

    def _start_sender(self) -> None:
        # A context of its own: the sender serves many callers, so it carries none of the first
        # one's context variables (its log bindings, its span).
        self._sender = asyncio.create_task(self._send_queued(), context=contextvars.Context())

    def _take(self) -> list[_Waiter]:
        """The next batch: the oldest waiters still waiting, within ``MAX_BATCH`` and
        ``MAX_BATCH_BYTES`` (one waiter always, whatever its size)."""
        batch: list[_Waiter] = []
        size = 0
        while self._queue and len(batch) < MAX_BATCH:
            waiter = self._queue[0]
            if waiter.answer.done() or waiter.answer.get_loop() is not self._loop:
                self._queue.popleft()  # its caller was cancelled before it was sent (or its loop ended)
                continue
            size += len(waiter.evaluation)
            if batch and size > MAX_BATCH_BYTES:
                break
            batch.append(self._queue.popleft())
        return batch

    async def _ask_queued(self, batch: list[_Waiter]) -> list[Decision]:
        if len(batch) > 1:
            evaluations, ids = [w.evaluation for w in batch], [w.correlation_id for w in batch]
            return await self._ask_many(evaluations, ids, batch[0].trace)
        one = batch[0]
        return [await self._ask_one(one.evaluation, one.correlation_id, one.trace)]

    async def _ask_one(
        self, evaluation: bytes, correlation_id: str | None, trace: dict[str, str]
    ) -> Decision:
        body = await self._post("/access/v1/evaluation", evaluation, correlation_id, trace)
        try:
            return decision_from_json(body)
        except ValueError as exc:
            return self._unreachable(repr(exc))

    async def _ask_many(
        self, evaluations: list[bytes], correlation_ids: list[str | None], trace: dict[str, str]
    ) -> list[Decision]:
        """One ``/evaluations`` request; ``X-Request-ID`` only when every evaluation shares it (each
        one's own id is in its ``correlation_id`` member)."""
        content = b'{"evaluations":[' + b",".join(evaluations) + b"]}"
        shared = set(correlation_ids)
        request_id = shared.pop() if len(shared) == 1 else None
        body = await self._post("/access/v1/evaluations", content, request_id, trace)
        answers = body.get("evaluations") if isinstance(body, dict) else None
        try:
            if not isinstance(answers, list) or len(answers) != len(evaluations):
                raise ValueError("the PDP answered a different number of evaluations")
            return [decision_from_json(a) for a in answers]
        except ValueError as exc:
            return [self._unreachable(repr(exc)) for _ in evaluations]

    # ----------------------------------------------------------------------- HTTP

    async def _post(
        self, path: str, content: bytes, correlation_id: str | None, trace: dict[str, str]
    ) -> object:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **trace}
        if correlation_id:
            headers["X-Request-ID"] = correlation_id
        try:
            for attempt in (1, 2):
                headers["Authorization"] = f"Bearer {await self._access_token(trace)}"
                response = await self._fetcher.request(
                    "POST", self.pdp + path, purpose="pep_pdp", content=content,
                    headers=headers, max_bytes=MAX_ANSWER_BYTES,
                )  # fmt: skip
                if response.status != 401 or attempt == 2:
                    break
                self._token = None  # expired or revoked early: retry once with a fresh token
            if response.status != 200:
                return {"error": f"status {response.status}"}
            return response.json()
        except (OutboundError, ValueError) as exc:
            return {"error": repr(exc)}

    async def _access_token(self, trace: dict[str, str]) -> str:
        if self._token is not None and self._token[1] > time.monotonic():
            return self._token[0]
        loop = asyncio.get_running_loop()
        if self._token_lock[0] is not loop:  # a lock belongs to one event loop
            self._token_lock = (loop, asyncio.Lock())
        async with self._token_lock[1]:  # requests side by side fetch one token, not one each
            if self._token is not None and self._token[1] > time.monotonic():
                return self._token[0]
            return await self._fetch_token(trace)

    async def _fetch_token(self, trace: dict[str, str]) -> str:
        form = {"grant_type": "client_credentials", "scope": self._scope}
        form["resource"] = self._audience
        headers = {"Accept": "application/json", **trace}
        self._auth.apply(form, headers)
        response = await self._fetcher.request(
            "POST", self._token_endpoint, purpose="pep_token", data=form, headers=headers
        )
        body = response.json() if response.status == 200 else {}
        body = body if isinstance(body, dict) else {}
        token, lifetime = body.get("access_token"), body.get("expires_in", 60)
        if not isinstance(token, str) or not isinstance(lifetime, int):
            raise ValueError(f"token endpoint answered {response.status}")
        # Renew a little early so a token never expires between here and the PDP.
        self._token = (token, time.monotonic() + max(lifetime - 30, lifetime / 2))
        return token

    def _unreachable(self, error: str) -> Decision:
        metrics.PEP_PDP_UNAVAILABLE.inc()
        log.error("pdp_unreachable", pdp=self.pdp, error=error)
        return Decision(False, (FailReason.PDP_UNREACHABLE.value,), "", uuid.uuid4().hex)

    async def aclose(self) -> None:
        if self._own_fetcher:
            await self._fetcher.aclose()


def _evaluation(request: DecisionRequest) -> bytes:
    """The evaluation's JSON, made in the caller's task; its correlation id as trustplane's extension
    member ``correlation_id`` (at most ``MAX_CORRELATION_ID`` characters, as the PDP requires)."""
    body = request_to_json(request)
    if request.correlation_id:
        body["correlation_id"] = request.correlation_id[:MAX_CORRELATION_ID]
    return orjson.dumps(body)


def _trace() -> dict[str, str]:
    """The W3C trace headers of the caller's span, taken in its task (a batch is sent by another)."""
    trace: dict[str, str] = {}
    inject_headers(trace)
    return trace


def _answer(waiters: Iterable[_Waiter], decisions: Iterable[Decision]) -> None:
    for waiter, decision in zip(waiters, decisions, strict=True):
        if not waiter.answer.done():  # a cancelled caller's answer is dropped
            waiter.answer.set_result(decision)
