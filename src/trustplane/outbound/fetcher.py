"""The one guarded fetcher every outbound request of trustplane goes through: clients' and partners'
``jwks_uri``, the partner conformance checker, and the PEP SDK's issuer metadata, JWKS, token,
introspection and PDP calls.

What holds for every request (docs/operations.md, "Outbound requests"):

- https only; plain http only to a loopback host, and only under an explicit development policy
  (``allow_insecure_loopback_jwks_uri``, ``federation_allow_insecure_loopback``, the PEP's
  ``OutboundPolicy.development()``); no credentials or fragment in the URL;
- the host is in the allow-list where one is configured (``federation_jwks_hosts``); a host that is
  an address literal or a local name (``localhost``, ``*.internal``) must itself be public;
- the name is resolved by the guard and refused when ANY address is not public; the connection goes
  to the address that was checked (:mod:`trustplane.outbound.connection`), so DNS rebinding fails;
- no redirects (a 3xx is refused, never followed); no proxy taken from the environment;
- connect, read and total timeouts; the body is read as a stream and the request is abandoned as soon
  as it passes ``max_bytes`` (a ``Content-Length`` above it is refused before reading), and a
  compressed body is refused (``Accept-Encoding: identity``), so a small answer cannot inflate;
- a per-host token bucket (``outbound_rate_per_host``, ``outbound_burst_per_host``);
- every request counts in ``trustplane_outbound_fetch_total{purpose,outcome}``; a refusal also logs
  one ``outbound_fetch_refused`` line naming the purpose, host, outcome and reason.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import httpcore
import httpx
import orjson
import structlog
from prometheus_client import Counter

from trustplane.outbound.addresses import Resolver, host_problem
from trustplane.outbound.connection import GuardedBackend, GuardedTransport
from trustplane.outbound.errors import OutboundError, OutboundRefused
from trustplane.outbound.http1 import Http1Pool, request_head
from trustplane.settings import Settings, is_loopback_host

log = structlog.get_logger("trustplane.outbound")
FETCHES = Counter(
    "trustplane_outbound_fetch_total",
    "Outbound HTTP requests by purpose and outcome (ok, refused_url, refused_address, "
    "rate_limited, redirect, too_large, timeout, error, bad_status, invalid)",
    ["purpose", "outcome"],
)
MAX_TRACKED_HOSTS = 10_000
#: URLs whose checks are remembered per fetcher (the PEP's few; the server's jwks_uri, one per client).
MAX_CHECKED_URLS = 1024
#: What ``httpx.AsyncClient`` would add (``Accept-Encoding`` is always ``identity``).
DEFAULT_HEADERS = {
    "Accept": "*/*",
    "Connection": "keep-alive",
    "User-Agent": f"python-httpx/{httpx.__version__}",
}
T = TypeVar("T")
#: httpcore's transport and protocol errors (what httpx maps to its ``HTTPError``), timeouts apart.
HTTPCORE_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
)


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """What one fetcher may do. ``allow_loopback``: development only (loopback addresses, and plain
    http to a loopback host). ``allowed_hosts``: None for any public host. ``rate_per_host``: requests
    per second per host, 0 for no limit (the PEP: its URLs are the operator's own)."""

    allow_loopback: bool = False
    allowed_hosts: frozenset[str] | None = None
    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    total_timeout: float = 10.0
    max_bytes: int = 64 * 1024
    rate_per_host: float = 0.0
    burst_per_host: int = 10
    verify: ssl.SSLContext | str | bool = True

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        allow_loopback: bool,
        allowed_hosts: frozenset[str] | None = None,
        max_bytes: int = 64 * 1024,
    ) -> OutboundPolicy:
        return cls(
            allow_loopback=allow_loopback,
            allowed_hosts=allowed_hosts,
            connect_timeout=settings.outbound_connect_timeout,
            read_timeout=settings.outbound_read_timeout,
            total_timeout=settings.outbound_total_timeout,
            max_bytes=max_bytes,
            rate_per_host=settings.outbound_rate_per_host,
            burst_per_host=settings.outbound_burst_per_host,
        )

    @classmethod
    def development(cls, **overrides: Any) -> OutboundPolicy:
        """Loopback allowed: a sandbox where the issuer, PDP or partner runs on this machine."""
        return cls(allow_loopback=True, **overrides)


class HostRateLimiter:
    """A token bucket per host: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate, self._burst = rate, burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, host: str) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic()
        tokens, then = self._buckets.pop(host, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - then) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[host] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_TRACKED_HOSTS:
            self._buckets.popitem(last=False)
        return allowed


@dataclass(frozen=True, slots=True)
class Checked:
    """A URL that passed the checks: its host, httpx's and httpcore's parse of it, and its origin
    (scheme, host, port) as the connection pools key it."""

    host: str
    target: httpx.URL
    core: httpcore.URL
    origin: tuple[bytes, str, int]


#: An answer's header fields as received: (name, value) pairs, in order.
RawHeaders = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Fetched:
    """A complete answer (never a redirect), its body within the size cap."""

    status: int
    raw_headers: RawHeaders
    body: bytes

    @property
    def headers(self) -> httpx.Headers:
        """The header fields as ``httpx.Headers`` (built when asked: no caller on the request
        path needs them)."""
        return httpx.Headers(self.raw_headers)

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise OutboundError("invalid", "not JSON") from None


def _check_answer(status: int, raw: RawHeaders, cap: int) -> None:
    """Refuse a redirect, a compressed body, a declared length above ``cap``, before reading."""
    if 300 <= status < 400:
        raise OutboundRefused("redirect", f"answered HTTP {status}: redirects are not followed")
    encodings, lengths = [], []
    for name, value in raw:
        key = name.lower()
        if key == b"content-length":
            lengths.append(value)
        elif key == b"content-encoding":
            encodings.append(value)
    if encodings:
        encoding = _joined(encodings, raw, "content-encoding").strip().lower()
        if encoding != "identity":
            raise OutboundRefused("invalid", f"a {encoding}-encoded body is not accepted")
    declared = _joined(lengths, raw, "content-length") if lengths else ""
    if declared.isdigit() and int(declared) > cap:
        raise OutboundRefused("too_large", f"larger than {cap} bytes")


def _joined(values: list[bytes], raw: RawHeaders, name: str) -> str:
    """What ``httpx.Headers(raw)[name]`` reads for a field present ``values`` times: the values
    joined with ", ". The ``Headers`` are built only for a value that is not ASCII (httpx then
    picks the decoding from all the fields)."""
    joined = b", ".join(values)
    if joined.isascii():
        return joined.decode("ascii")
    value: str = httpx.Headers(raw)[name]
    return value


class OutboundFetcher:
    """``transport`` replaces the network in tests (httpx's mock transport); every rule above except
    the address check of the connection (there is no connection) still applies to it.

    With its own guarded transport (the default), a request goes straight to the transport's
    httpcore pool, as ``httpx.AsyncClient`` would send it but without httpx's request and response
    objects, and a URL's checks (the same answer for the same URL under one policy) are made once
    per fetcher: the address check is made at every connection. A request then costs about half
    the client CPU it did through the client (``bench/outbound_client.py``)."""

    def __init__(
        self,
        policy: OutboundPolicy | None = None,
        *,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rate_limiter: HostRateLimiter | None = None,
        backend: GuardedBackend | None = None,
    ) -> None:
        self.policy = policy = policy or OutboundPolicy()
        if transport is None:
            guard = backend or GuardedBackend(resolver, allow_loopback=policy.allow_loopback)
            transport = GuardedTransport(guard, policy.verify)
        self._limiter = rate_limiter or HostRateLimiter(policy.rate_per_host, policy.burst_per_host)
        self._limited = rate_limiter is not None or policy.rate_per_host > 0  # 0: no bucket to ask
        timeout = httpx.Timeout(
            policy.read_timeout, connect=policy.connect_timeout, pool=policy.connect_timeout
        )
        # The transport is called directly, without ``httpx.AsyncClient`` (about a fifth of the CPU
        # of a request): no redirect is followed, no proxy, no cookie kept, no retry; the timeouts
        # go with each request as the client would send them.
        self._transport = transport
        #: Our own transport: GET and POST go to our HTTP/1.1 pool on its guarded backend
        #: (:meth:`_send_http1`), anything else straight to its httpcore pool (:meth:`_send_core`).
        self._pool = self._http1 = None
        if isinstance(transport, GuardedTransport):
            self._pool = transport._pool
            self._http1 = Http1Pool(transport.backend, transport.ssl_context)
        self._timeouts = timeout.as_dict()
        self._checked: dict[str, Checked] = {}
        self._counters: dict[tuple[str, str], Any] = {}

    def url_problem(self, url: str) -> str | None:
        """Why this URL would be refused before any connection (configuration-time checks)."""
        try:
            self._check_url(url)
        except OutboundRefused as exc:
            return exc.reason
        return None

    async def get_json(
        self, url: str, *, purpose: str, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """GET a JSON object (200 only) or raise :class:`OutboundError`."""
        return await self._counted(purpose, url, self._get_json(url, max_bytes))

    async def request(
        self,
        method: str,
        url: str,
        *,
        purpose: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        data: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
    ) -> Fetched:
        """Send one request under the policy; any status but a redirect is returned to the caller.
        Raises :class:`OutboundRefused` or :class:`OutboundError` (already counted and logged)."""
        work = self._request(method, url, headers, content, data, max_bytes)
        return await self._counted(purpose, url, work)

    async def _counted(self, purpose: str, url: str, work: Awaitable[T]) -> T:
        """``work``'s result, counted; its failures counted, logged and mapped to outcomes. The
        total timeout is ``work``'s (:meth:`_request`): :class:`TimeoutError` when it passed."""
        try:
            result = await work
        except TimeoutError:
            raise self._failed(
                purpose, url, OutboundError("timeout", "no answer in time")
            ) from None
        except httpx.TimeoutException as exc:
            raise self._failed(purpose, url, OutboundError("timeout", type(exc).__name__)) from None
        except httpx.HTTPError as exc:
            error = OutboundError("error", f"{type(exc).__name__}: {exc}")
            raise self._failed(purpose, url, error) from None
        except OutboundError as exc:
            raise self._failed(purpose, url, exc) from None
        self._counter(purpose, "ok").inc()
        return result

    def _counter(self, purpose: str, outcome: str) -> Any:
        """``FETCHES``'s child for the pair, looked up once per fetcher."""
        child = self._counters.get((purpose, outcome))
        if child is None:
            child = self._counters[purpose, outcome] = FETCHES.labels(purpose, outcome)
        return child

    async def _get_json(self, url: str, max_bytes: int | None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        fetched = await self._request("GET", url, headers, None, None, max_bytes)
        if fetched.status != 200:
            raise OutboundError("bad_status", f"answered HTTP {fetched.status}")
        document = fetched.json()
        if not isinstance(document, dict):
            raise OutboundError("invalid", "not a JSON object")
        return document

    async def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        content: bytes | None,
        data: Mapping[str, str] | None,
        max_bytes: int | None,
    ) -> Fetched:
        checked = self._checked_url(url)
        host, target, core_url = checked.host, checked.target, checked.core
        if self._limited and not self._limiter.allow(host):
            raise OutboundRefused("rate_limited", f"more than the per-host rate to {host}")
        cap = max_bytes or self.policy.max_bytes
        if self._http1 is not None and method in ("GET", "POST"):
            # the total is on the client's one timer per request (http1.Deadline)
            return await self._send_http1(method, checked, headers, content, data, cap)
        async with asyncio.timeout(self.policy.total_timeout):
            if self._pool is not None:
                return await self._send_core(method, target, core_url, headers, content, data, cap)
            request = httpx.Request(
                method,
                target,
                headers={**DEFAULT_HEADERS, **(headers or {}), "Accept-Encoding": "identity"},
                content=content,
                data=data,
                extensions={"timeout": self._timeouts},
            )
            return await self._send(request, cap)

    def _checked_url(self, url: str) -> Checked:
        """:meth:`_check_url`'s answer for a URL that passed, remembered (it depends on the URL and
        the policy alone; the address check is made at every connection)."""
        checked = self._checked.get(url)
        if checked is None:
            host = self._check_url(url)
            if len(self._checked) >= MAX_CHECKED_URLS:
                self._checked.clear()
            target = httpx.URL(url)
            core = httpcore.URL(
                scheme=target.raw_scheme,
                host=target.raw_host,
                port=target.port,
                target=target.raw_path,
            )
            scheme = target.raw_scheme
            port = target.port or (443 if scheme == b"https" else 80)
            origin = (scheme, target.raw_host.decode("ascii"), port)
            checked = self._checked[url] = Checked(host, target, core, origin)
        return checked

    def _check_url(self, url: str) -> str:
        try:
            parts = urlsplit(url)
            host, _ = parts.hostname, parts.port
        except ValueError:
            raise OutboundRefused("refused_url", "not a valid URL") from None
        if not host or parts.username is not None or parts.fragment:
            raise OutboundRefused(
                "refused_url", "must be an absolute URL without credentials or fragment"
            )
        loopback_dev = self.policy.allow_loopback and is_loopback_host(host)
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback_dev):
            raise OutboundRefused("refused_url", "must use https")
        allowed = self.policy.allowed_hosts
        if allowed is not None and host not in allowed and not loopback_dev:
            raise OutboundRefused("refused_url", f"host {host} is not in the allow-list")
        problem = host_problem(host, allow_loopback=self.policy.allow_loopback)
        if problem is not None:
            raise OutboundRefused("refused_url", problem)
        return host

    async def _send_http1(
        self,
        method: str,
        checked: Checked,
        headers: Mapping[str, str] | None,
        content: bytes | None,
        data: Mapping[str, str] | None,
        cap: int,
    ) -> Fetched:
        """The request as :meth:`_send_core` sends it (the same head, byte for byte), on
        :class:`~trustplane.outbound.http1.Http1Pool`; httpcore's errors become the same outcomes."""
        assert self._http1 is not None
        fields = {**DEFAULT_HEADERS, **(headers or {}), "Accept-Encoding": "identity"}
        if data is not None:
            content = urlencode(list(data.items()), doseq=True).encode()
            fields.setdefault("Content-Type", "application/x-www-form-urlencoded")
        length = len(content or b"") if content is not None or method == "POST" else None
        target = checked.target
        try:
            head = request_head(method, target.raw_path, target.netloc, fields.items(), length)
            status, raw, body = await self._http1.send(
                checked.origin,
                head + content if content else head,
                cap=cap,
                check=lambda status, raw: _check_answer(status, raw, cap),
                connect_timeout=self.policy.connect_timeout,
                read_timeout=self.policy.read_timeout,
                total_timeout=self.policy.total_timeout,
            )
        except httpcore.TimeoutException as exc:
            raise OutboundError("timeout", type(exc).__name__) from None
        except HTTPCORE_ERRORS as exc:
            raise OutboundError("error", f"{type(exc).__name__}: {exc}") from None
        return Fetched(status, raw, body)

    async def _send_core(
        self,
        method: str,
        target: httpx.URL,
        url: httpcore.URL,
        headers: Mapping[str, str] | None,
        content: bytes | None,
        data: Mapping[str, str] | None,
        cap: int,
    ) -> Fetched:
        """The request as httpx would send it (same head: ``Host``, ``Content-Length``, the
        client's default headers), handed to the guarded pool without httpx's request and response
        objects; httpcore's errors become the outcomes httpx's would have."""
        assert self._pool is not None
        fields = {**DEFAULT_HEADERS, **(headers or {}), "Accept-Encoding": "identity"}
        if data is not None:
            content = urlencode(list(data.items()), doseq=True).encode()
            fields.setdefault("Content-Type", "application/x-www-form-urlencoded")
        head = [(b"Host", target.netloc)]
        if content is not None or method in ("POST", "PUT", "PATCH"):
            head.append((b"Content-Length", b"%d" % len(content or b"")))
        head += [(k.encode("ascii"), v.encode("ascii")) for k, v in fields.items()]
        request = httpcore.Request(
            method.encode("ascii"),
            url,
            headers=head,
            content=content or b"",
            extensions={"timeout": self._timeouts},
        )
        try:
            response = await self._pool.handle_async_request(request)
            try:
                status, answer = response.status, response.headers
                _check_answer(status, answer, cap)
                body = b""
                async for chunk in response.aiter_stream():  # identity only: the raw bytes
                    body += chunk
                    if len(body) > cap:
                        raise OutboundRefused("too_large", f"larger than {cap} bytes")
                return Fetched(status, answer, body)
            finally:
                await response.aclose()
        except httpcore.TimeoutException as exc:
            raise OutboundError("timeout", type(exc).__name__) from None
        except HTTPCORE_ERRORS as exc:
            raise OutboundError("error", f"{type(exc).__name__}: {exc}") from None

    async def _send(self, request: httpx.Request, cap: int) -> Fetched:
        response = await self._transport.handle_async_request(request)
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            raw = response.headers.raw
            _check_answer(response.status_code, raw, cap)
            body = b""
            async for chunk in stream:  # identity only: the raw bytes
                body += chunk
                if len(body) > cap:
                    raise OutboundRefused("too_large", f"larger than {cap} bytes")
            return Fetched(response.status_code, raw, body)
        finally:
            await stream.aclose()

    def _failed(self, purpose: str, url: str, exc: OutboundError) -> OutboundError:
        self._counter(purpose, exc.outcome).inc()
        try:
            host = urlsplit(url).hostname
        except ValueError:
            host = None
        refused = isinstance(exc, OutboundRefused)
        event = "outbound_fetch_refused" if refused else "outbound_fetch_failed"
        log.warning(event, purpose=purpose, host=host, outcome=exc.outcome, reason=exc.reason)
        return exc

    async def aclose(self) -> None:
        if self._http1 is not None:
            await self._http1.aclose()
        await self._transport.aclose()
