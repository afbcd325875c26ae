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

    Concurrent :meth:`decide` calls are coalesced: one request to the PDP is in flight at a time,
    and the decisions asked meanwhile go together in the next one, an AuthZEN ``/evaluations``
    batch of at most ``MAX_BATCH`` (a decision asked while nothing is in flight goes at once, alone,
    to ``/evaluation``). Each evaluation carries its own ``correlation_id`` member, so the PDP records
    every decision under its caller's id. The requests run in a task of their own: a caller that is
    cancelled only gives up its answer (or its place in the queue), never the others' request.
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
    ) -> None:
        self._own_fetcher = fetcher is None
        policy = OutboundPolicy(read_timeout=timeout, total_timeout=2 * timeout)
        self._fetcher = fetcher or OutboundFetcher(policy)
        self.pdp = check_url(pdp.rstrip("/"), "PDP URL", self._fetcher)
        self._token_endpoint = check_url(token_endpoint, "token endpoint", self._fetcher)
        self._auth, self._scope = auth, scope
        self._audience = audience or f"{self.pdp}/access/v1"
        self._token: tuple[str, float] | None = None
        self._queue: deque[_Waiter] = deque()
        self._sender: asyncio.Task[None] | None = None

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
        answer: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        trace: dict[str, str] = {}
        inject_headers(trace)  # the caller's span, taken now: the request is sent by another task
        self._queue.append(_Waiter(_evaluation(request), correlation_id, trace, answer))
        if self._sender is None or self._sender.done():  # done: its event loop has ended
            self._start_sender()
        return await answer

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        """The caller's own batch, sent as it is (not merged with coalesced decisions)."""
        if not requests:
            return []
        evaluations = [_evaluation(r) for r in requests]
        trace: dict[str, str] = {}
        inject_headers(trace)
        return await self._ask_many(evaluations, [r.correlation_id for r in requests], trace)

    # ----------------------------------------------------------------------- coalescing

    async def _send_queued(self) -> None:
        """Send the queue, one request at a time, until it is empty. Every waiter taken gets an
        answer, a fail-closed deny if anything at all goes wrong (this task cancelled included)."""
        batch: list[_Waiter] = []
        try:
            while self._queue:
                batch = self._take()
                if batch:
                    _answer(batch, await self._ask_queued(batch))
                    batch = []
        except BaseException as exc:
            _answer(batch, [self._unreachable(repr(exc)) for _ in batch])
            if not isinstance(exc, Exception):
                waiting = list(self._queue)  # cancelled: nobody would send these any more
                self._queue.clear()
                _answer(waiting, [self._unreachable(repr(exc)) for _ in waiting])
                raise
            log.exception("pdp_batch_failed")
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
            if waiter.answer.done():  # its caller was cancelled before it was sent
                self._queue.popleft()
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
        body = await self._post(
            "/access/v1/evaluation", one.evaluation, one.correlation_id, one.trace
        )
        try:
            return [decision_from_json(body)]
        except ValueError as exc:
            return [self._unreachable(repr(exc))]

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


def _answer(waiters: Iterable[_Waiter], decisions: Iterable[Decision]) -> None:
    for waiter, decision in zip(waiters, decisions, strict=True):
        if not waiter.answer.done():  # a cancelled caller's answer is dropped
            waiter.answer.set_result(decision)
