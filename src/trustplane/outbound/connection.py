"""Connections to vetted addresses only: an ``httpcore`` network backend that resolves the host
itself, refuses it if ANY address is not public (:func:`~trustplane.outbound.addresses.refusal`), and
connects to one of the addresses it just checked.

Because the address connected is the address checked, DNS rebinding (a name that answers a public
address to the check and 127.0.0.1 to the connect) has no second answer to exploit: there is only one
resolution, here. TLS still runs against the host name: ``httpcore`` calls ``start_tls`` on the
returned stream with ``server_hostname`` = the URL's host, so SNI and certificate verification use the
name and the ``Host`` header is unchanged.

Each stream it returns (:class:`CoalescingStream`) holds what httpcore writes until it first reads:
httpcore's HTTP/1.1 writes a request's head and its body separately, and the two become one socket
write (one TCP segment, one TLS record) instead of two, the receiving side reading one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import socket
import ssl
from collections.abc import Iterable

import httpcore
import httpx

from trustplane.outbound import addresses
from trustplane.outbound.addresses import Resolver, literal_address, refusal
from trustplane.outbound.errors import OutboundRefused

#: Seconds an idle outbound connection is kept for reuse: well below the 5 s keep-alive of uvicorn's
#: and Node's defaults, so that we close first and never send on a connection the server is closing.
KEEPALIVE_EXPIRY = 2.0


class _TcpOnly(httpcore.AsyncNetworkBackend):
    """A backend that connects TCP only: a unix socket is never connected."""

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise OutboundRefused("refused_address", "unix sockets are never connected")


class GuardedBackend(_TcpOnly):
    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        allow_loopback: bool = False,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._resolver, self._allow_loopback = resolver, allow_loopback
        self._inner = inner or AsyncioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failure: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in await self.vetted(host, port, timeout):
            try:
                stream = await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
                return CoalescingStream(stream)
            except httpcore.ConnectError as exc:  # try the next vetted address
                failure = exc
        raise failure

    async def vetted(self, host: str, port: int, seconds: float | None) -> list[str]:
        """Every address ``host`` resolves to, or :class:`OutboundRefused` if one is not public."""
        literal = literal_address(host)
        if literal is not None:
            answers = [str(literal)]
        else:
            try:
                # looked up at call time, so a test can replace the system resolver
                resolve = self._resolver or addresses.system_resolver
                answers = await asyncio.wait_for(resolve(host, port), seconds)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        for answer in answers:
            address = literal_address(answer)
            reason = (
                "not an address"
                if address is None
                else refusal(address, allow_loopback=self._allow_loopback)
            )
            if reason is not None:
                raise OutboundRefused("refused_address", f"{host} resolves to {answer}: {reason}")
        return answers

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


#: Bytes held before they are written anyway: a request's head and a PDP batch (at most 128 KiB of
#: evaluations) are far below; a larger body goes out in writes of this size.
COALESCE_BYTES = 256 * 1024


class CoalescingStream(httpcore.AsyncNetworkStream):
    """A network stream whose writes are held until the next read (or until ``COALESCE_BYTES`` are
    held), then sent as one write. HTTP/1.1 never needs its request on the wire before it reads the
    answer, so nothing waits on the hold; a request that is abandoned before reading is not sent.

    As in httpcore, a failed write of the request does not stop the read: a server that hangs up
    early may still have answered (its error status), and a connection that is gone fails the read.
    """

    __slots__ = ("_held", "_inner", "_timeout")

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._held: list[bytes] = []
        self._timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        self._held.append(buffer)
        self._timeout = timeout
        if sum(map(len, self._held)) >= COALESCE_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        held, self._held = self._held, []
        await self._inner.write(held[0] if len(held) == 1 else b"".join(held), self._timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self._held:
            # httpcore's own rule: after a failed write, read what the server may have answered
            with contextlib.suppress(httpcore.WriteError):
                await self._flush()
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._held = []
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        if self._held:
            await self._flush()
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return CoalescingStream(tls)

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class AsyncioBackend(_TcpOnly):
    """httpcore's network backend on asyncio's own streams (TCP_NODELAY, as asyncio sets it), in
    place of its anyio one: the same errors (``ConnectError``, ``ReadTimeout``...), without anyio's
    cancel scope per read and write and its checkpoints (each one more turn of the event loop)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = None if local_address is None else (local_address, 0)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class AsyncioStream(httpcore.AsyncNetworkStream):
    __slots__ = ("_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    # ``timeout`` None: no timer of its own (the fetcher's HTTP/1.1 client bounds the request
    # with one timer: trustplane.outbound.http1.Deadline); ``asyncio.timeout(None)`` still costs.

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("read timed out") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            if timeout is None:
                await self._writer.drain()
                return
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("write timed out") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: written after the transport closed
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            self._writer.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> object:
        extra = self._writer.get_extra_info
        if info == "ssl_object":
            return extra("ssl_object")
        if info == "client_addr":
            return extra("sockname")
        if info == "server_addr":
            return extra("peername")
        if info == "socket":
            return extra("socket")
        if info == "is_readable":  # httpcore: an idle connection that is readable is not reused
            return self._reader.at_eof() or _readable(extra("socket"))
        return None


def _readable(sock: socket.socket | None) -> bool:
    """Whether a read on ``sock`` would return at once (data the peer sent while the connection was
    idle, or its close): a socket that is gone counts as readable, so it is never reused."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@functools.cache
def verified_context() -> ssl.SSLContext:
    """The TLS context of every verified outbound connection (certifi's CA bundle; ``SSL_CERT_*`` from
    the environment ignored), made once per process: loading the bundle costs about 60 ms of CPU,
    and each of the server's fetchers would otherwise load it twice at start."""
    return httpx.create_ssl_context(verify=True, trust_env=False)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request/response mapping, exception mapping), on a connection pool whose
    every connection goes through :class:`GuardedBackend`; no proxy from the environment, no retry."""

    def __init__(self, backend: GuardedBackend, verify: ssl.SSLContext | str | bool = True) -> None:
        context = (
            verified_context()
            if verify is True
            else httpx.create_ssl_context(verify=verify, trust_env=False)
        )
        super().__init__(verify=context, trust_env=False, retries=0)
        #: what :class:`~trustplane.outbound.http1.Http1Pool` connects with (the fetcher's GET
        #: and POST): the same guarded backend and TLS context as this transport's pool
        self.backend, self.ssl_context = backend, context
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=100,  # httpx's defaults: the PEP calls its PDP on the hot path
            max_keepalive_connections=20,
            # below every server's keep-alive (uvicorn's and Node's default: 5 s): a connection
            # reused as the server closes it fails with a reset (seen as a spurious PDP deny)
            keepalive_expiry=KEEPALIVE_EXPIRY,
            network_backend=backend,
        )
