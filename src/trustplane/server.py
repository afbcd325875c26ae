"""``trustplane serve``: bind the listeners, then run uvicorn with trustplane's limits.

Two listeners: the public one (``TRUSTPLANE_HOST``/``TRUSTPLANE_PORT``: the protocol and admin APIs)
and the operations one (``TRUSTPLANE_OPS_HOST``/``TRUSTPLANE_OPS_PORT``, default 127.0.0.1:9464, 0
disables it: ``/metrics``, ``/readyz``, ``/healthz``, ``/openapi.json``, ``/docs``). Both sockets are
bound before anything is printed, so a taken port ends the command with one line naming the setting
(exit 2) instead of a banner followed by uvicorn's ``Errno 98``.

Every worker process serves both sockets (the kernel spreads connections over the workers); one ASGI
app per process (:class:`Listeners`) dispatches by the local port a connection came in on. With
``workers > 1`` the metrics are kept in Prometheus multiprocess mode (:mod:`trustplane.metrics`): the
supervisor prepares a fresh directory for the run before spawning the workers, marks each worker that
exits as dead (its live gauges stop counting), and removes the directory at the end; a ``/metrics``
scrape answers the sum over the workers, whichever one takes the connection. The supervisor and the
workers' tie to it (a worker ends when its supervisor is gone): :mod:`trustplane.supervisor`.

Header limits are applied while the request head is parsed (:class:`BoundedHttpToolsProtocol`): the
``httptools`` parser that uvicorn uses by default has no limit of its own (``h11_max_incomplete_event_size``
applies to ``h11`` only), so a 1 MB header or 2,000 header fields used to be buffered and handed to the
app.

TLS (``TRUSTPLANE_TLS_CERTIFICATE``/``TRUSTPLANE_TLS_KEY``, :mod:`trustplane.tls.context`): both
listeners speak HTTPS only. uvicorn does not provide the ASGI ``tls`` extension, so our protocol class
adds it (:meth:`BoundedHttpToolsProtocol.connection_made`): ``scope["extensions"]["tls"]`` carries the
verified client certificate of the connection, which :func:`trustplane.tls.client_certificate` reads.

One write per response: uvicorn writes a response's head (``http.response.start``) and its body as
two ``transport.write`` calls, two ``send`` system calls and two TCP segments for every token. The
protocol holds the head (:class:`_HeadWithBody`) and sends it with the body's first write, or when
the response completes or the connection closes without one (``HEAD``, an empty body). A
``100 Continue`` is written before the response starts and is never held.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import sys
from collections.abc import MutableMapping
from typing import Any, ClassVar

import httptools
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from trustplane.dependencies import warn_unreachable
from trustplane.limits import REQUESTS_REFUSED, RequestLimits, refusal, request_limits
from trustplane.logging import configure_logging
from trustplane.settings import Settings, SettingsError, load_settings
from trustplane.startup import freeze_after_start, quiet_gc
from trustplane.supervisor import follow_supervisor, supervise
from trustplane.tls.context import cipher_ids, server_context, tls_extension

WORKER_HEALTHCHECK_TIMEOUT = 60

#: What a taken or forbidden address blames: (setting, CLI flag or None).
_PUBLIC = ("TRUSTPLANE_PORT", "--port")
_OPS = ("TRUSTPLANE_OPS_PORT", None)


# --------------------------------------------------------------------------- binding


def _bind(host: str, port: int, blame: tuple[str, str | None]) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SettingsError(_bind_error(host, port, blame, exc)) from None
    sock.set_inheritable(True)
    return sock


def _bind_error(host: str, port: int, blame: tuple[str, str | None], exc: OSError) -> str:
    setting, flag = blame
    named = f"{setting} / {flag}" if flag else setting
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why, todo = (
            "address already in use",
            "stop the process that holds it or choose another port",
        )
    elif exc.errno == errno.EACCES:
        why, todo = "permission denied", "choose a port above 1023"
    else:
        why, todo = exc.strerror or str(exc), "check the host and port"
    return f"invalid setting {named}: cannot listen on {where}: {why}; {todo}"


def bind(settings: Settings) -> list[socket.socket]:
    """The public socket, then the operations socket (if enabled), bound but not yet listening.
    Raises :class:`SettingsError` with one line naming the setting when an address cannot be used."""
    public = _bind(settings.host, settings.port, _PUBLIC)
    if not settings.ops_port:
        return [public]
    try:
        return [public, _bind(settings.ops_host, settings.ops_port, _OPS)]
    except SettingsError:
        public.close()
        raise


# --------------------------------------------------------------------------- running


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        "trustplane.server:listeners_from_env",
        factory=True,
        workers=settings.workers,
        http=BoundedHttpToolsProtocol,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=settings.keep_alive,  # docs/operations.md "Listeners"
        # a spawned worker answers the supervisor's health pings only once it has imported
        # everything; on a loaded host that takes longer than uvicorn's 5 s, and the supervisor
        # would kill and respawn workers forever
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT,
        ssl_context_factory=_ssl_context if settings.tls_enabled else None,
    )


def _ssl_context(_config: uvicorn.Config, _default: object) -> ssl.SSLContext:
    """uvicorn's ``ssl_context_factory``, run in each worker process (a module-level function, so
    the worker's pickled configuration can name it): trustplane's context, from the environment."""
    return server_context(load_settings())


def run(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Serve until SIGINT/SIGTERM. ``sockets``: from :func:`bind` (bound here if not given)."""
    sockets = sockets if sockets is not None else bind(settings)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(warn_unreachable(settings))
    config = uvicorn_config(settings)
    if settings.workers > 1:
        supervise(config, sockets, settings)
        return
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(3)  # the app failed to start; uvicorn logged why


class Listeners:
    """One process's ASGI app: requests that came in on the operations port go to the operations
    app, everything else (and the lifespan) to the public app."""

    def __init__(self, public: ASGIApp, ops: ASGIApp | None, ops_port: int) -> None:
        self.public, self.ops, self.ops_port = public, ops, ops_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.public(scope, receive, _freezing_on_start(send))
            return
        if self.ops is not None and scope["type"] == "http":
            local = scope.get("server")
            if local is not None and local[1] == self.ops_port:
                await self.ops(scope, receive, send)
                return
        await self.public(scope, receive, send)


def freezing_when_started(app: ASGIApp) -> ASGIApp:
    """``app`` as a server process runs it (``trustplane reference serve``): its long-lived
    objects frozen out of the collector's walks once its lifespan has started, as
    :class:`Listeners` does for ``trustplane serve``."""

    async def frozen(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            send = _freezing_on_start(send)
        await app(scope, receive, send)

    return frozen


def _freezing_on_start(send: Send) -> Send:
    """The worker's long-lived objects leave the collector's walks once it has started
    (:func:`trustplane.startup.freeze_after_start`): just before uvicorn is told so."""

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            freeze_after_start()
        await send(message)

    return sending


def listeners_from_env() -> Listeners:
    """uvicorn factory (each worker process): settings from the environment. A worker of
    ``--workers N`` first ties itself to its supervisor (:func:`follow_supervisor`)."""
    settings = load_settings()
    follow_supervisor(settings)
    with quiet_gc():
        from trustplane.app import create_app, create_ops_app

    BoundedHttpToolsProtocol.limits = request_limits(settings)
    public = create_app(settings)
    ops = create_ops_app(public.state.services, public.openapi) if settings.ops_port else None
    return Listeners(public, ops, settings.ops_port)


# --------------------------------------------------------------------------- header limits


class _HeadTooLarge(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol with limits on the request head while it is parsed, answered
    431 with the connection closed and nothing more buffered:

    * more than ``max_header_count`` header fields;
    * header names and values together larger than ``max_header_bytes`` (as at the ASGI entry);
    * more than twice ``max_header_bytes`` received while the head is still incomplete (the request
      line and the field being received count here: a 1 MB header value is refused after 64 KiB,
      not after it has been buffered). Counted per received chunk, so a pipelined request may run one
      chunk over."""

    limits: ClassVar[RequestLimits] = RequestLimits()
    #: Per TLS context: OpenSSL cipher name -> IANA number (the ASGI extension's ``cipher_suite``).
    _cipher_ids: ClassVar[dict[int, dict[str, int]]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls: dict[str, Any] | None = None
        self._in_head = True
        self._head_received = 0
        self._field_bytes = 0
        self._field_count = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """trustplane's server hook for the ASGI TLS extension (asgiref ``specs/tls.rst``), which
        uvicorn does not implement: asyncio calls this after the handshake, so the peer certificate
        (verified against ``tls_client_ca``) is known; it is read once per connection."""
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            context = ssl_object.context
            ids = self._cipher_ids.get(id(context))
            if ids is None:
                ids = self._cipher_ids.setdefault(id(context), cipher_ids(context))
            self._tls = tls_extension(ssl_object, ids)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_received += len(data)
            if self._head_received > 2 * self.limits.max_header_bytes:
                self._refuse(
                    f"the request head is larger than {2 * self.limits.max_header_bytes} bytes"
                )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:  # ASGI: the extension is present on TLS connections only
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]
        self._in_head = True
        self._head_received = self._field_bytes = self._field_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_count += 1
        self._field_bytes += len(name) + len(value)
        if self._field_count > self.limits.max_header_count:
            raise _HeadTooLarge(f"more than {self.limits.max_header_count} header fields")
        if self._field_bytes > self.limits.max_header_bytes:
            raise _HeadTooLarge(
                f"the header fields are larger than {self.limits.max_header_bytes} bytes"
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if self.cycle is not None and not isinstance(self.cycle.transport, _HeadWithBody):
            _HeadWithBody(self.cycle)  # not an upgrade's early return: a new cycle

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers every parser error 400; a limit raised by our callbacks is a 431."""
        error = sys.exc_info()[1]
        cause = error.__context__ if isinstance(error, httptools.HttpParserCallbackError) else None
        if isinstance(cause, _HeadTooLarge):
            self._refuse(cause.detail)
        else:
            super().send_400_response(msg)

    def _refuse(self, detail: str) -> None:
        REQUESTS_REFUSED.labels(reason="headers").inc()
        url: bytes = getattr(self, "url", b"") or b"/"
        headers, body = refusal(431, detail, url.split(b"?", 1)[0].decode("latin-1"))
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()


class _HeadWithBody:
    """A response cycle's transport that sends the response head together with the body.

    uvicorn's cycle writes the head when the app sends ``http.response.start``, then each body
    chunk; before the head it may only have written ``100 Continue`` (which the client waits for,
    so it is never held). The head is held and goes out with the next write, in one ``write`` (one
    system call, one TCP segment). A head still held when the response completes without a body
    write (``HEAD``) or the connection is closed is sent then. Installs itself on ``cycle``; every
    other attribute is the connection's transport's. It keeps no reference to the cycle: a cycle
    between the two would leave every response's objects to the garbage collector."""

    __slots__ = ("_completed", "_head", "_held", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._transport: asyncio.Transport = cycle.transport
        self._head = b""
        self._held = False  # the head has been written (held or sent)
        self._completed = cycle.on_response
        cycle.transport = self  # type: ignore[assignment]
        cycle.on_response = self._on_response

    def write(self, data: bytes) -> None:
        if not self._held and data != _CONTINUE:
            self._held, self._head = True, data
            return
        head, self._head = self._head, b""
        self._transport.write(head + data if head else data)

    def flush(self) -> None:
        head, self._head = self._head, b""
        if head:
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def _on_response(self) -> None:
        self.flush()
        self._completed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: What uvicorn writes before the response when a request expects it (RFC 9110 §10.1.1).
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
