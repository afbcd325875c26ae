r"""Request size limits, enforced at the ASGI entry before any handler runs.

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
* text (docs/architecture.md, "Input rules"): PostgreSQL's ``text`` cannot hold a NUL character, so a
  NUL in the path (``%00``), the query string or a header field is answered 400 before any handler
  runs; a JSON body (``application/json``, ``*+json``) is checked when its handler has read it
  whole: a ``\u0000`` escape, an unpaired surrogate escape (UTF-8 cannot encode it, so no driver can
  send it) or bytes that are not UTF-8 raise :class:`UnstorableText` from ``receive``, which
  the handler answers in its own shape (a handler that answers it with anything but a 4xx has its
  answer replaced by the entry's 400). Form bodies are checked by their one parser
  (``trustplane.protocol.form``). Bodies are not read early for this: an unauthenticated caller is
  still answered before a byte of its body is read.

The error shape follows the route: routes whose errors are RFC 6749 §5.2 JSON (every API of
trustplane: ``OAUTH_SHAPED_PREFIXES``) answer ``{"error": "invalid_request", ...}``; the SSF push
receiver answers RFC 8935 §2.3's ``{"err", "description"}`` and the RFC 8936 poll endpoint carries
both (as their handlers do); everything else answers RFC 9457 ``application/problem+json``.
"""

from __future__ import annotations

import re
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
    "/events",
    "/ssf",
)

#: Paths whose refusals echo the request's ``X-Request-ID`` (AuthZEN 1.0 §10.1.3: the PDP MUST answer
#: a request that carries one with the same identifier, errors included).
REQUEST_ID_PREFIXES = ("/access/v1/evaluation", "/access/v1/evaluations")

#: RFC 8935 §2.3 (push delivery) errors are ``{"err", "description"}``; the RFC 8936 poll endpoint
#: answers both that and the ``error`` members of the rest of the SSF API (``trustplane.ssf.http``).
SET_DELIVERY_PATH = "/ssf/receiver"
SET_POLL_PREFIX = "/ssf/poll"


#: RFC 9110 §15.5.14: the body is larger than this route accepts. Raised by the bounded ``receive``
#: so that a handler's own ``OAuth2Error`` mapping answers 413 ``invalid_request``; the one class of
#: that wire error (``errors.ContentTooLargeError``), under the name this module's callers use.
RequestBodyTooLarge = ContentTooLargeError


class UnstorableText(InvalidRequestError):
    """A string of the request that PostgreSQL's ``text`` cannot hold (module doc): raised from
    ``receive`` when a JSON body's text is read, so that a handler with its own code for a bad body
    (RFC 7591 ``invalid_client_metadata``) can answer with it."""


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
    if _matches(path, SET_DELIVERY_PATH):
        body = orjson.dumps({"err": "invalid_request", "description": detail})
        kind = b"application/json"
    elif oauth_shaped(path):
        error: dict[str, str] = {"error": "invalid_request", "error_description": detail}
        if _matches(path, SET_POLL_PREFIX):
            error |= {"err": "invalid_request", "description": detail}
        body = orjson.dumps(error)
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


async def send_refusal(
    send: Send,
    status: int,
    detail: str,
    path: str,
    reason: str,
    echoed: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """``echoed``: request header fields the answer repeats (:func:`echoed_fields`)."""
    REQUESTS_REFUSED.labels(reason=reason).inc()
    headers, body = refusal(status, detail, path)
    headers.extend(echoed)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_REFUSALS: dict[int, type[InvalidRequestError]] = {
    400: InvalidRequestError,
    413: RequestBodyTooLarge,
    431: RequestHeadersTooLarge,
}


class _Head:
    """What the entry needs from the header fields, in one pass over them."""

    __slots__ = ("chunked", "json", "length", "nul", "problem")

    def __init__(self, headers: Sequence[tuple[bytes, bytes]], limits: RequestLimits) -> None:
        #: why the head is refused (431), or None
        self.problem: str | None = None
        #: the ``Content-Length`` (RFC 9110 §8.6): None if absent, -1 if malformed or repeated with
        #: different values
        self.length: int | None = None
        self.chunked = False
        #: a header value holds a NUL character (400: no ``text`` column can store it)
        self.nul = False
        #: the body is JSON (its text is checked as it is read: :func:`json_text_problem`)
        self.json = False
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
            elif name == b"content-type":
                self.json = _is_json(value)
            if b"\x00" in value:
                self.nul = True
        if size > limits.max_header_bytes:
            self.problem = f"the header fields are larger than {limits.max_header_bytes} bytes"

    def _length(self, value: bytes) -> None:
        value = value.strip()
        length = int(value) if value.isdigit() else -1
        self.length = length if self.length in (None, length) else -1


def _is_json(content_type: bytes) -> bool:
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or kind.endswith(b"+json")


def _nul_in_target(scope: Scope) -> bool:
    """A NUL in the path (the server has decoded ``%00``) or in the raw query string."""
    query: bytes = scope.get("query_string", b"")
    return "\x00" in scope["path"] or b"%00" in query or b"\x00" in query


#: A JSON ``\uXXXX`` escape that is one (preceded by an even number of backslashes: ``\\u0000``
#: is a backslash and the text ``u0000``).
_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u([0-9a-fA-F]{4})")


def json_text_problem(body: bytes) -> str | None:
    r"""Why the strings of a JSON body cannot be stored as PostgreSQL ``text``, or None: bytes that
    are not UTF-8 (RFC 8259 §8.1), a ``\u0000`` escape, a surrogate escape without its other half
    (RFC 8259 §8.2). The body need not be valid JSON otherwise (its handler says so); the common
    body, ASCII without a ``\u`` escape, costs two scans."""
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return "the request body is not UTF-8"
    if b"\\u" not in body:
        return None
    low_due = -1  # where a high surrogate's low half must start
    for match in _ESCAPE.finditer(body):
        code, at = int(match[1], 16), match.start(1) - 2
        if low_due >= 0:
            if at != low_due or not 0xDC00 <= code <= 0xDFFF:
                return _UNPAIRED
            low_due = -1
        elif code == 0:
            return "a string in the request body holds a NUL character"
        elif 0xD800 <= code <= 0xDBFF:
            low_due = match.end()
        elif 0xDC00 <= code <= 0xDFFF:
            return _UNPAIRED
    return _UNPAIRED if low_due >= 0 else None


_UNPAIRED = "a string in the request body holds an unpaired surrogate"


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
            await self._refuse(send, 431, head.problem, scope, "headers")
            return
        if head.length == -1:
            await self._refuse(send, 400, "malformed Content-Length", scope, "content_length")
            return
        if head.nul or _nul_in_target(scope):
            await self._refuse(send, 400, _NUL_IN_TARGET, scope, "nul")
            return
        cap = self.limits.body_cap(path)
        if head.length is not None and not head.chunked:
            if head.length > cap:
                await self._refuse(send, 413, _too_large(cap), scope, "body_declared")
                return
            # within the cap: the HTTP server's framing delivers at most Content-Length bytes, and
            # an unread rest is small enough to drain
            scope[DECLARED_BODY] = head.length
            if not head.json:
                await self.app(scope, receive, send)
                return
            await _Exchange(self.app, cap, path, False, True).run(scope, receive, send)
            return
        await _Exchange(self.app, cap, path, head.chunked, head.json).run(scope, receive, send)

    async def _refuse(
        self, send: Send, status: int, detail: str, scope: Scope, reason: str
    ) -> None:
        path: str = scope["path"]
        hook = self._hooks.get(path)
        if hook is not None:
            try:
                await hook(_REFUSALS[status](detail))
            except Exception as exc:  # the refusal stands whatever happens to its record
                log.error("refusal_hook_failed", path=path, error=repr(exc))
        echoed = echoed_fields(scope) if status != 431 else ()
        await send_refusal(send, status, detail, path, reason, echoed)


def echoed_fields(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The ``X-Request-ID`` a refusal at :data:`REQUEST_ID_PREFIXES` repeats (none for a value
    holding a NUL: that is what is refused)."""
    if not any(_matches(scope["path"], prefix) for prefix in REQUEST_ID_PREFIXES):
        return []
    return [
        (b"x-request-id", value)
        for name, value in scope["headers"]
        if name == b"x-request-id" and b"\x00" not in value
    ][:1]


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


_NUL_IN_TARGET = "the request target or a header field holds a NUL character"


class _Exchange:
    """One request: the body counted (and a JSON body's text checked) while it is read, the
    response watched for the refused case."""

    __slots__ = (
        "_app",
        "_cap",
        "_chunks",
        "_json",
        "_path",
        "_read",
        "_refused",
        "_replaced",
        "_started",
        "_unread",
    )

    def __init__(self, app: ASGIApp, cap: int, path: str, has_body: bool, json: bool) -> None:
        self._app, self._cap, self._path = app, cap, path
        self._read = 0
        #: why the body was refused while it was read (413 too large, 400 its text), or None
        self._refused: InvalidRequestError | None = None
        self._unread = has_body
        self._json = json
        self._chunks: list[bytes] = []
        self._started = False
        self._replaced = False

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_receive() -> Message:
            if self._refused is not None:
                raise self._refused
            message = await receive()
            if message["type"] == "http.request":
                self._received(message)
            return message

        async def watched_send(message: Message) -> None:
            refused = self._refused
            if message["type"] == "http.response.start":
                self._started = True
                if refused is not None and not _answers(refused, message["status"]):
                    # the handler mapped the refusal to something else: the entry answers it
                    await self._send_refusal(send, refused)
                    self._replaced = True
                    return
                if self._unread or refused is not None:
                    message = {**message, "headers": [*message["headers"], _CLOSE]}
            elif self._replaced:
                return
            await send(message)

        try:
            await self._app(scope, bounded_receive, watched_send)
        except InvalidRequestError as exc:
            if exc is not self._refused:
                raise
            if self._replaced:  # a framework answered 500 and re-raised: the refusal is sent
                return
            if self._started:
                raise
            await self._send_refusal(send, exc)

    def _received(self, message: Message) -> None:
        """Count a body message (413 past the cap); a JSON body's text checked at its end."""
        chunk: bytes = message.get("body", b"")
        self._read += len(chunk)
        last = not message.get("more_body", False)
        if last:
            self._unread = False
        if self._read > self._cap:
            REQUESTS_REFUSED.labels(reason="body_streamed").inc()
            self._refused = RequestBodyTooLarge(_too_large(self._cap))
            raise self._refused
        if not self._json:
            return
        if not last:
            self._chunks.append(chunk)
            return
        problem = json_text_problem(b"".join([*self._chunks, chunk]) if self._chunks else chunk)
        self._chunks = []
        if problem is not None:
            REQUESTS_REFUSED.labels(reason="body_text").inc()
            self._refused = UnstorableText(problem)
            raise self._refused

    async def _send_refusal(self, send: Send, refused: InvalidRequestError) -> None:
        headers, body = refusal(refused.status_code, refused.description, self._path)
        await send(
            {"type": "http.response.start", "status": refused.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})


def _answers(refused: InvalidRequestError, status: int) -> bool:
    """Whether the handler's answer stands for the refusal: 413 for a body too large (whatever the
    handler made of it), any 4xx of the handler's own for a body's text."""
    if isinstance(refused, RequestBodyTooLarge):
        return status == 413
    return 400 <= status < 500


_CLOSE = (b"connection", b"close")
