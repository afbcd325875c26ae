"""Request size limits, enforced at the ASGI entry before any handler runs.

Every request body and header is bounded before it is read (BRIEF, "Trust boundaries"):

* headers: at most ``max_header_count`` fields and ``max_header_bytes`` bytes (names + values) — else
  431 (RFC 6585 §5). The HTTP server applies the same limits while parsing (``trustplane.server``);
  this check covers every other server the app may run under.
* body: a ``Content-Length`` over the route's cap is answered 413 (RFC 9110 §15.5.14) without reading
  a byte; a body without one (chunked) is counted while it is read and the read stops at the first
  chunk that crosses the cap (so at most cap + one chunk is ever held), answered 413 as well.
* a response sent before a streamed request body was read to its end carries ``Connection: close``,
  so the server drops the connection instead of draining an unread (possibly huge) body. A body
  with a ``Content-Length`` within the cap is passed through untouched: the HTTP server's framing
  delivers at most that many bytes (the hot paths pay one pass over the header fields, no more).
  Such a request is marked in its scope (:data:`DECLARED_BODY`), so that the app's hot-path adapter
  may read the body whole before its handler runs (``trustplane.app``).

The error shape follows the route: routes whose errors are RFC 6749 §5.2 JSON (every API of
trustplane: ``OAUTH_SHAPED_PREFIXES``) answer ``{"error": "invalid_request", ...}``; everything else
answers RFC 9457 ``application/problem+json``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
import structlog
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trustplane.errors import ContentTooLargeError, InvalidRequestError
from trustplane.settings import Settings

log = structlog.get_logger("trustplane.limits")

REQUESTS_REFUSED = Counter(
    "trustplane_requests_refused_total",
    "Requests refused at the entry for their size, by reason",
    ["reason"],
)

#: Paths whose error answers are RFC 6749 §5.2 JSON; a prefix matches itself and ``prefix/...``.
OAUTH_SHAPED_PREFIXES = (
    "/token",
    "/introspect",
    "/revoke",
    "/register",
    "/authorize",
    "/par",
    "/access/v1",
    "/federation",
    "/mandates",
    "/audit",
)


#: RFC 9110 §15.5.14: the body is larger than this route accepts. Raised by the bounded ``receive``
#: so that a handler's own ``OAuth2Error`` mapping answers 413 ``invalid_request``; the one class of
#: that wire error (``errors.ContentTooLargeError``), under the name this module's callers use.
RequestBodyTooLarge = ContentTooLargeError


class RequestHeadersTooLarge(InvalidRequestError):
    """RFC 6585 §5: too many header fields, or too large together."""

    status_code = 431


#: Called with the refusal when the entry refuses a request to that path (the token endpoint audits
#: its refusals, unparsed bodies included); a failing hook is logged, the refusal still sent.
RefusalHook = Callable[[InvalidRequestError], Awaitable[None]]


#: Scope key of a request whose body has a ``Content-Length`` within its route's cap and no
#: ``Transfer-Encoding`` (the value: that length): its body is at most that long whatever the client
#: sends, so reading it whole is bounded.
DECLARED_BODY = "trustplane.declared_body"

#: The body cap of ``POST /audit/events`` (at most 100 events; the forwarder sends under 512 KiB).
INGEST_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The caps. ``route_caps``: (path prefix, body cap) pairs overriding ``max_body``; the longest
    matching prefix wins."""

    max_body: int = 64 * 1024
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    route_caps: tuple[tuple[str, int], ...] = ()

    def body_cap(self, path: str) -> int:
        best, cap = -1, self.max_body
        for prefix, value in self.route_caps:
            if len(prefix) > best and _matches(path, prefix):
                best, cap = len(prefix), value
        return cap


def request_limits(settings: Settings) -> RequestLimits:
    """The caps from settings; routes that accept more than ``max_body_bytes`` by design get theirs
    (AuthZEN batches; policy simulations carry a whole candidate bundle)."""
    return RequestLimits(
        max_body=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_header_count=settings.max_header_count,
        route_caps=(
            ("/access/v1/evaluation", settings.max_authzen_body_bytes),
            ("/access/v1/evaluations", settings.max_authzen_body_bytes),
            ("/access/v1/simulations", settings.max_policy_body_bytes),
            ("/audit/events", INGEST_BODY_BYTES),  # a batch of signed settlement events
        ),
    )


def _matches(path: str, prefix: str) -> bool:
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


def oauth_shaped(path: str) -> bool:
    return any(_matches(path, prefix) for prefix in OAUTH_SHAPED_PREFIXES)


_TITLES = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large"}


def refusal(status: int, detail: str, path: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a refusal in the route's error shape. ``Connection: close``: the body (or
    the rest of the headers) was not read, so the connection cannot be reused."""
    if oauth_shaped(path):
        body = orjson.dumps({"error": "invalid_request", "error_description": detail})
        kind = b"application/json"
    else:
        problem = {"type": "about:blank", "title": _TITLES[status], "status": status}
        body = orjson.dumps({**problem, "detail": detail})
        kind = b"application/problem+json"
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    ]
    return headers, body


async def send_refusal(send: Send, status: int, detail: str, path: str, reason: str) -> None:
    REQUESTS_REFUSED.labels(reason=reason).inc()
    headers, body = refusal(status, detail, path)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_REFUSALS: dict[int, type[InvalidRequestError]] = {
    400: InvalidRequestError,
    413: RequestBodyTooLarge,
    431: RequestHeadersTooLarge,
}


class _Head:
    """What the entry needs from the header fields, in one pass over them."""

    __slots__ = ("chunked", "length", "problem")

    def __init__(self, headers: Sequence[tuple[bytes, bytes]], limits: RequestLimits) -> None:
        #: why the head is refused (431), or None
        self.problem: str | None = None
        #: the ``Content-Length`` (RFC 9110 §8.6): None if absent, -1 if malformed or repeated with
        #: different values
        self.length: int | None = None
        self.chunked = False
        if len(headers) > limits.max_header_count:
            self.problem = f"more than {limits.max_header_count} header fields"
            return
        size = 0
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"content-length":
                self._length(value)
            elif name == b"transfer-encoding":
                self.chunked = True
        if size > limits.max_header_bytes:
            self.problem = f"the header fields are larger than {limits.max_header_bytes} bytes"

    def _length(self, value: bytes) -> None:
        value = value.strip()
        length = int(value) if value.isdigit() else -1
        self.length = length if self.length in (None, length) else -1


class BoundedRequests:
    """ASGI middleware applying :class:`RequestLimits` to every HTTP request (see module doc)."""

    def __init__(
        self, app: ASGIApp, limits: RequestLimits, hooks: Mapping[str, RefusalHook] | None = None
    ) -> None:
        self.app, self.limits = app, limits
        self._hooks = dict(hooks or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        head = _Head(scope["headers"], self.limits)
        if head.problem is not None:
            await self._refuse(send, 431, head.problem, path, "headers")
            return
        if head.length == -1:
            await self._refuse(send, 400, "malformed Content-Length", path, "content_length")
            return
        cap = self.limits.body_cap(path)
        if head.length is not None and not head.chunked:
            if head.length > cap:
                await self._refuse(send, 413, _too_large(cap), path, "body_declared")
                return
            # within the cap: the HTTP server's framing delivers at most Content-Length bytes, and
            # an unread rest is small enough to drain
            scope[DECLARED_BODY] = head.length
            await self.app(scope, receive, send)
            return
        await _Exchange(self.app, cap, path, head.chunked).run(scope, receive, send)

    async def _refuse(self, send: Send, status: int, detail: str, path: str, reason: str) -> None:
        hook = self._hooks.get(path)
        if hook is not None:
            try:
                await hook(_REFUSALS[status](detail))
            except Exception as exc:  # the refusal stands whatever happens to its record
                log.error("refusal_hook_failed", path=path, error=repr(exc))
        await send_refusal(send, status, detail, path, reason)


class StreamingRequest(Protocol):
    """What :func:`read_body` needs of a request (Starlette's ``Request`` has it)."""

    def stream(self) -> AsyncIterator[bytes]: ...


async def read_body(request: StreamingRequest, cap: int) -> bytes:
    """The body, read chunk by chunk and stopped at the first chunk that crosses ``cap`` (413
    ``invalid_request``): the one bounded reader of handlers that must hold whatever server they are
    mounted under to their own cap, inside the entry's."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise RequestBodyTooLarge(_too_large(cap))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(cap: int) -> str:
    return f"the request body is larger than {cap} bytes"


class _Exchange:
    """One request: the body counted while it is read, the response watched for the overflow case."""

    __slots__ = ("_app", "_cap", "_overflow", "_path", "_read", "_replaced", "_started", "_unread")

    def __init__(self, app: ASGIApp, cap: int, path: str, has_body: bool) -> None:
        self._app, self._cap, self._path = app, cap, path
        self._read = 0
        self._overflow = False
        self._unread = has_body
        self._started = False
        self._replaced = False

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_receive() -> Message:
            if self._overflow:
                raise RequestBodyTooLarge(_too_large(self._cap))
            message = await receive()
            if message["type"] == "http.request":
                self._read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self._unread = False
                if self._read > self._cap:
                    self._overflow = True
                    REQUESTS_REFUSED.labels(reason="body_streamed").inc()
                    raise RequestBodyTooLarge(_too_large(self._cap))
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._started = True
                if self._overflow and message["status"] != 413:
                    # the handler mapped the overflow to something else: the answer is still 413
                    headers, body = refusal(413, _too_large(self._cap), self._path)
                    await send({"type": "http.response.start", "status": 413, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    self._replaced = True
                    return
                if self._unread or self._overflow:
                    message = {**message, "headers": [*message["headers"], _CLOSE]}
            elif self._replaced:
                return
            await send(message)

        try:
            await self._app(scope, bounded_receive, watched_send)
        except RequestBodyTooLarge:
            if self._replaced:  # a framework answered 500 and re-raised: the 413 is already sent
                return
            if self._started:
                raise
            headers, body = refusal(413, _too_large(self._cap), self._path)
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})


_CLOSE = (b"connection", b"close")
