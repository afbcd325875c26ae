"""The guarded outbound fetcher (trustplane.outbound): every rule tested against real sockets on
loopback where a network is involved, and against a resolver the test controls for DNS.

Loopback servers here stand in for "somewhere the fetcher must not go": with the default policy every
one of them must stay untouched, which each test checks by the server's own connection count.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from trustplane.outbound import (
    HostRateLimiter,
    OutboundError,
    OutboundFetcher,
    OutboundPolicy,
    OutboundRefused,
    host_problem,
    literal_address,
    refusal,
)
from trustplane.outbound import addresses as addresses_module
from trustplane.outbound import fetcher as fetcher_module
from trustplane.outbound.connection import GuardedBackend

PUBLIC_IP = "93.184.216.34"

# --------------------------------------------------------------------------- the address rule

REFUSED_ADDRESSES = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "shared (100.64/10)"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "private"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "private"),
    ("255.255.255.255", "private"),
    ("192.0.2.1", "private"),
    ("198.18.0.1", "private"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fd00::1", "private"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "private"),
    ("::ffff:127.0.0.1", "loopback (embedded in ::ffff:7f00:1)"),
    ("::ffff:169.254.169.254", "link-local (embedded in ::ffff:a9fe:a9fe)"),
    ("64:ff9b::a00:1", "private (embedded in 64:ff9b::a00:1)"),
    ("64:ff9b:1::7f00:1", "loopback (embedded in 64:ff9b:1::7f00:1)"),
    ("2002:7f00:1::", "loopback (embedded in 2002:7f00:1::)"),
    ("::7f00:1", "reserved"),
]


@pytest.mark.parametrize(("address", "reason"), REFUSED_ADDRESSES)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", [PUBLIC_IP, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_development_setting_lets_loopback_through_and_nothing_else() -> None:
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert refusal(ipaddress.ip_address(address), allow_loopback=True) is None
    for address in ("10.0.0.1", "169.254.169.254", "0.0.0.0", "fd00::1"):
        assert refusal(ipaddress.ip_address(address), allow_loopback=True) is not None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("169.254.169.254", "169.254.169.254"),
    ],
)
def test_every_written_form_of_an_address_is_read_as_one(host: str, address: str) -> None:
    assert literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["keys.example", "1.example", "deadbeef.example", "0x7g"])
def test_names_are_not_mistaken_for_addresses(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST.", "a.localhost", "printer.local", "metadata.google.internal"]
)
def test_local_names_are_refused_without_resolving(host: str) -> None:
    assert host_problem(host) == f"host {host} is a local name"


# --------------------------------------------------------------------------- loopback servers


@dataclass
class Loopback:
    """A raw TCP server on 127.0.0.1 answering with ``respond``; counts connections, keeps the
    request heads it read and how many body bytes it managed to send."""

    respond: Callable[[asyncio.StreamWriter, Loopback], Awaitable[None]]
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    sent: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/doc"


@pytest.fixture
async def loopback() -> AsyncIterator[Callable[..., Awaitable[Loopback]]]:
    servers: list[asyncio.Server] = []

    async def start(
        respond: Callable[[asyncio.StreamWriter, Loopback], Awaitable[None]],
        tls: ssl.SSLContext | None = None,
    ) -> Loopback:
        state = Loopback(respond)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                state.heads.append(await reader.readuntil(b"\r\n\r\n"))
                await respond(writer, state)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass  # the fetcher hung up: that is what several tests want
            except asyncio.CancelledError:
                return  # the test is over (endless, silent and trickling servers never finish)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def answer(body: bytes, status: str = "200 OK", **headers: str) -> Any:
    async def respond(writer: asyncio.StreamWriter, state: Loopback) -> None:
        lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", "connection: close"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()

    return respond


async def endless(writer: asyncio.StreamWriter, state: Loopback) -> None:
    """200 with no length, then an endless body: only the reader's cap can stop it."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
    chunk = b"[" + b" " * 16383
    while True:
        writer.write(chunk)
        await writer.drain()
        state.sent += len(chunk)


async def silent(writer: asyncio.StreamWriter, state: Loopback) -> None:
    await asyncio.Event().wait()  # never answers


async def trickle(writer: asyncio.StreamWriter, state: Loopback) -> None:
    """Headers at once, then one byte of body every 50 ms: each read is quick, the whole is not."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nconnection: close\r\n\r\n")
    while True:
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.05)


def dev(**overrides: Any) -> OutboundFetcher:
    return OutboundFetcher(OutboundPolicy.development(**overrides))


async def outcome_of(fetcher: OutboundFetcher, url: str, purpose: str = "test") -> str:
    try:
        await fetcher.get_json(url, purpose=purpose)
    except OutboundError as exc:
        return exc.outcome
    finally:
        await fetcher.aclose()
    return "ok"


def counted(purpose: str, outcome: str) -> float:
    labels = {"purpose": purpose, "outcome": outcome}
    return REGISTRY.get_sample_value("trustplane_outbound_fetch_total", labels) or 0.0


# --------------------------------------------------------------------------- URL rules


REFUSED_URLS = [
    ("http://keys.example/jwks", "must use https"),
    ("ftp://keys.example/jwks", "must use https"),
    ("https://127.0.0.1/jwks", "host 127.0.0.1 is loopback"),
    ("https://2130706433/jwks", "host 2130706433 is loopback"),
    ("https://[::1]/jwks", "host ::1 is loopback"),
    ("https://[::ffff:169.254.169.254]/", "host ::ffff:169.254.169.254 is link-local"),
    ("https://169.254.169.254/latest/meta-data/", "host 169.254.169.254 is link-local"),
    ("https://10.0.0.8/jwks", "host 10.0.0.8 is private"),
    ("https://192.168.0.1/jwks", "host 192.168.0.1 is private"),
    ("https://0.0.0.0/jwks", "host 0.0.0.0 is unspecified"),
    ("https://localhost/jwks", "host localhost is a local name"),
    ("https://metadata.google.internal/", "host metadata.google.internal is a local name"),
    ("https://user:pw@keys.example/jwks", "must be an absolute URL without credentials"),
    ("https://keys.example/jwks#k", "must be an absolute URL without credentials"),
    ("https://keys.example:99999/", "not a valid URL"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_URLS)
async def test_urls_that_can_never_be_fetched_are_refused_before_any_request(
    url: str, reason: str
) -> None:
    requests: list[httpx.Request] = []
    fetcher = OutboundFetcher(transport=httpx.MockTransport(lambda r: requests.append(r) or 0))  # type: ignore[func-returns-value]
    before = counted("test", "refused_url")
    with pytest.raises(OutboundRefused) as refused:
        await fetcher.get_json(url, purpose="test")
    assert (refused.value.outcome, refused.value.reason.startswith(reason)) == (
        "refused_url",
        True,
    ), refused.value.reason
    assert requests == []
    assert counted("test", "refused_url") == before + 1


async def test_the_host_allow_list_holds() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, json={"keys": []})

    policy = OutboundPolicy(allowed_hosts=frozenset({"keys.partner.example"}))
    fetcher = OutboundFetcher(policy, transport=httpx.MockTransport(handler))
    assert await fetcher.get_json("https://keys.partner.example/jwks", purpose="t") == {"keys": []}
    with pytest.raises(OutboundRefused, match="not in the allow-list"):
        await fetcher.get_json("https://elsewhere.example/jwks", purpose="t")
    assert seen == ["keys.partner.example"]
    await fetcher.aclose()


async def test_loopback_over_http_needs_the_development_policy(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    server = await loopback(answer(b'{"keys": []}'))
    assert await outcome_of(OutboundFetcher(), server.url) == "refused_url"
    https_url = server.url.replace("http:", "https:")
    assert await outcome_of(OutboundFetcher(), https_url) == "refused_url"
    assert server.connections == 0
    assert await outcome_of(dev(), server.url) == "ok"
    assert await outcome_of(dev(), f"http://localhost:{server.port}/doc") == "ok"
    assert server.connections == 2


# --------------------------------------------------------------------------- resolution and connect


class Resolver:
    """A resolver the test controls: answers[i] is the i-th answer, the last one repeats."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers, self.calls = list(answers), 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Stands in for the socket layer: records where it is asked to connect, connects nowhere."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kw: Any) -> Any:
        self.connects.append((host, port))
        raise httpcore.ConnectError("recording backend: not connecting")


class WireBackend(httpcore.AnyIOBackend):
    """The real socket layer, recording every write made on the streams it opens."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def connect_tcp(self, *args: Any, **kw: Any) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_tcp(*args, **kw)
        writes = self.writes

        class Recorded(httpcore.AsyncNetworkStream):
            async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
                writes.append(buffer)
                await stream.write(buffer, timeout)

            async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
                return await stream.read(max_bytes, timeout)

            async def aclose(self) -> None:
                await stream.aclose()

            def get_extra_info(self, info: str) -> Any:
                return stream.get_extra_info(info)

        return Recorded()


async def test_a_request_head_and_body_go_out_in_one_write(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    """httpcore writes the head, then the body; the guarded stream holds them until it reads the
    answer and sends them together: one socket write (one segment) per small request."""
    server = await loopback(answer(b'{"decision": true}'))
    wire = WireBackend()
    backend = GuardedBackend(allow_loopback=True, inner=wire)
    fetcher = OutboundFetcher(OutboundPolicy.development(), backend=backend)
    body = b'{"subject": {"type": "Client", "id": "c-1"}}'
    fetched = await fetcher.request(
        "POST", server.url, purpose="t", content=body, headers={"Content-Type": "application/json"}
    )
    await fetcher.aclose()
    assert fetched.json() == {"decision": True}
    assert len(wire.writes) == 1, wire.writes
    assert wire.writes[0].startswith(b"POST /doc HTTP/1.1\r\n")
    assert wire.writes[0].endswith(b"\r\n\r\n" + body)
    assert server.heads[0] + body == wire.writes[0]


async def test_no_cookie_is_kept_between_requests() -> None:
    """A cookie one answer sets is not sent with the next request (to that host or another)."""
    cookies: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cookies.append(request.headers.get("cookie"))
        return httpx.Response(200, json={}, headers={"set-cookie": "session=abc; Path=/"})

    fetcher = OutboundFetcher(transport=httpx.MockTransport(handler))
    for _ in range(2):
        assert await fetcher.get_json("https://keys.example/jwks", purpose="t") == {}
    await fetcher.aclose()
    assert cookies == [None, None]


@pytest.mark.parametrize(
    "answer_",
    [
        ["127.0.0.1"],
        ["10.0.0.1"],
        ["169.254.169.254"],
        [PUBLIC_IP, "10.0.0.1"],  # ANY bad answer refuses the host
        ["2606:4700:4700::1111", "::1"],
        ["::ffff:192.168.0.1"],
        ["not-an-address"],
    ],
)
async def test_a_name_resolving_to_a_non_public_address_is_refused_at_connect(
    answer_: list[str],
) -> None:
    inner = RecordingBackend()
    backend = GuardedBackend(Resolver(answer_), inner=inner)
    fetcher = OutboundFetcher(backend=backend)
    with pytest.raises(OutboundRefused) as refused:
        await fetcher.get_json("https://keys.client.example/jwks", purpose="t")
    assert refused.value.outcome == "refused_address"
    assert refused.value.reason.startswith("keys.client.example resolves to ")
    assert inner.connects == []
    await fetcher.aclose()


async def test_dns_rebinding_fails_because_the_address_checked_is_the_address_connected(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    """First answer public, every later answer 127.0.0.1 (a rebinding name). The first fetch
    connects to the public address it vetted, by address, never by name (the socket layer never
    sees the name, so it cannot resolve it again); the second resolution is refused. The loopback
    server the name rebinds to is never contacted."""
    server = await loopback(answer(b'{"keys": []}'))
    resolver, inner = Resolver([PUBLIC_IP], ["127.0.0.1"]), RecordingBackend()
    fetcher = OutboundFetcher(backend=GuardedBackend(resolver, inner=inner))
    url = f"https://rebind.example:{server.port}/jwks"

    with pytest.raises(OutboundError) as first:
        await fetcher.get_json(url, purpose="t")
    assert first.value.outcome == "error"
    assert inner.connects == [(PUBLIC_IP, server.port)]

    with pytest.raises(OutboundRefused) as second:
        await fetcher.get_json(url, purpose="t")
    assert second.value.reason == "rebind.example resolves to 127.0.0.1: loopback"
    assert inner.connects == [(PUBLIC_IP, server.port)]
    assert (resolver.calls, server.connections) == (2, 0)
    await fetcher.aclose()


async def test_the_default_resolver_is_the_one_checked(
    monkeypatch: pytest.MonkeyPatch, loopback: Callable[..., Awaitable[Loopback]]
) -> None:
    """Replacing the system resolver (as DNS would answer) reaches the fetcher's connect check."""
    server = await loopback(answer(b"{}"))
    monkeypatch.setattr(addresses_module, "system_resolver", Resolver(["127.0.0.1"]))
    url = f"https://keys.client.example:{server.port}/jwks"
    assert await outcome_of(OutboundFetcher(), url) == "refused_address"
    assert server.connections == 0


def _tls_for(name: str, tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str]]:
    """A self-signed certificate for ``name``: the server context (recording SNI) and a client
    context trusting only that certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    sni: list[str] = []
    server.sni_callback = lambda _sock, name_, _ctx: sni.append(str(name_)) and None  # type: ignore[func-returns-value]
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client, sni


async def test_tls_runs_against_the_name_while_the_vetted_address_is_connected(
    loopback: Callable[..., Awaitable[Loopback]], tmp_path: Path
) -> None:
    """The name resolves (by our resolver) to 127.0.0.1; the development policy lets loopback
    through. SNI, the certificate check and the Host header all use the name."""
    server_tls, client_tls, sni = _tls_for("keys.partner.test", tmp_path)
    server = await loopback(answer(b'{"keys": []}'), tls=server_tls)
    policy = OutboundPolicy.development(verify=client_tls)
    resolver = Resolver(["127.0.0.1"])
    fetcher = OutboundFetcher(policy, resolver=resolver)
    url = f"https://keys.partner.test:{server.port}/jwks"
    assert await fetcher.get_json(url, purpose="t") == {"keys": []}
    assert sni == ["keys.partner.test"]
    assert f"host: keys.partner.test:{server.port}" in server.heads[0].decode().lower()
    assert resolver.calls == 1
    await fetcher.aclose()

    strict = OutboundFetcher(OutboundPolicy(verify=client_tls), resolver=Resolver(["127.0.0.1"]))
    assert await outcome_of(strict, url) == "refused_address"
    assert server.connections == 1


async def test_connect_failures_are_errors_with_their_cause(
    loopback: Callable[..., Awaitable[Loopback]], tmp_path: Path
) -> None:
    """The network backend's failures keep httpx's names: an untrusted certificate and a closed
    port are ``ConnectError``, outcome ``error``."""
    server_tls, _, _ = _tls_for("keys.partner.test", tmp_path)
    server = await loopback(answer(b"{}"), tls=server_tls)
    fetcher = OutboundFetcher(OutboundPolicy.development(), resolver=Resolver(["127.0.0.1"]))
    for url in [f"https://keys.partner.test:{server.port}/jwks", "http://127.0.0.1:1/jwks"]:
        with pytest.raises(OutboundError) as failed:
            await fetcher.get_json(url, purpose="t")
        assert failed.value.outcome == "error"
        assert failed.value.reason.startswith("ConnectError: "), failed.value.reason
    await fetcher.aclose()


# --------------------------------------------------------------------------- answers


async def test_the_size_cap_holds_while_streaming_an_endless_body(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    server = await loopback(endless)
    fetcher = dev(max_bytes=64 * 1024, total_timeout=30.0)
    with pytest.raises(OutboundRefused) as refused:
        await fetcher.get_json(server.url, purpose="t")
    assert (refused.value.outcome, refused.value.reason) == ("too_large", "larger than 65536 bytes")
    await fetcher.aclose()
    # the server got to write the cap plus what sat in socket buffers, not the endless rest
    assert server.sent < 16 * 1024 * 1024, server.sent


async def test_a_declared_length_above_the_cap_is_refused_before_reading(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    server = await loopback(answer(b"[" + b" " * 70_000 + b"]"))
    assert await outcome_of(dev(max_bytes=64 * 1024), server.url) == "too_large"


async def test_a_compressed_body_is_refused(loopback: Callable[..., Awaitable[Loopback]]) -> None:
    server = await loopback(answer(b"\x1f\x8b not really gzip", content_encoding="gzip"))
    assert await outcome_of(dev(), server.url) == "invalid"
    assert b"accept-encoding: identity" in server.heads[0].lower()


@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary Redirect"])
async def test_redirects_are_refused_not_followed(
    loopback: Callable[..., Awaitable[Loopback]], status: str
) -> None:
    target = await loopback(answer(b"{}"))
    redirector = await loopback(answer(b"", status, location=target.url))
    before = counted("test", "redirect")
    assert await outcome_of(dev(), redirector.url) == "redirect"
    assert target.connections == 0
    assert counted("test", "redirect") == before + 1


async def test_a_silent_server_times_out_on_read(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    server = await loopback(silent)
    assert await outcome_of(dev(read_timeout=0.2), server.url) == "timeout"


async def test_a_trickling_server_hits_the_total_timeout(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    server = await loopback(trickle)
    assert await outcome_of(dev(read_timeout=5.0, total_timeout=0.5), server.url) == "timeout"


async def test_a_status_or_body_the_caller_cannot_use(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    for body, status, outcome in [
        (b'{"keys": []}', "500 Internal Server Error", "bad_status"),
        (b"not json", "200 OK", "invalid"),
        (b"[1, 2]", "200 OK", "invalid"),
    ]:
        server = await loopback(answer(body, status))
        assert await outcome_of(dev(), server.url) == outcome


def _check_through_httpx(status: int, raw: list[tuple[bytes, bytes]], cap: int) -> None:
    """The head checks as they were written on ``httpx.Headers`` (built twice per request)."""
    headers = httpx.Headers(raw)
    if 300 <= status < 400:
        raise OutboundRefused("redirect", f"answered HTTP {status}: redirects are not followed")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise OutboundRefused("invalid", f"a {encoding}-encoded body is not accepted")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise OutboundRefused("too_large", f"larger than {cap} bytes")


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (200, []),
        (200, [(b"Content-Length", b"10")]),
        (200, [(b"content-length", b"100")]),
        (200, [(b"content-length", b"100 ")]),
        (200, [(b"content-length", b"10"), (b"Content-Length", b"10")]),
        (200, [(b"content-encoding", b"gzip")]),
        (200, [(b"Content-Encoding", b" Identity\t")]),
        (200, [(b"content-encoding", b"identity"), (b"CONTENT-ENCODING", b"identity")]),
        (200, [(b"content-encoding", b"")]),
        (200, [(b"content-encoding", b"identity\xc2\x85")]),  # UTF-8: NEL, stripped as space
        (200, [(b"content-encoding", b"identity\xa0"), (b"x", b"\xff")]),  # Latin-1: NBSP
        (200, [(b"content-encoding", b"br\xe9")]),
        (200, [(b"content-length", b"\xd9\xa1\xd9\xa0\xd9\xa0")]),  # Arabic-Indic "100"
        (301, [(b"location", b"https://elsewhere.example/")]),
    ],
)
def test_the_head_checks_read_the_fields_as_httpx_headers_did(
    status: int, raw: list[tuple[bytes, bytes]]
) -> None:
    def outcome(check: Callable[[int, list[tuple[bytes, bytes]], int], None]) -> Any:
        try:
            check(status, raw, 64)
        except OutboundRefused as exc:
            return exc.outcome, exc.reason
        return None

    assert outcome(fetcher_module._check_answer) == outcome(_check_through_httpx)


# --------------------------------------------------------------------------- rate limit, signals


async def test_the_per_host_rate_limit() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200, json={})

    policy = OutboundPolicy(rate_per_host=0.001, burst_per_host=2)
    fetcher = OutboundFetcher(policy, transport=httpx.MockTransport(handler))
    outcomes = []
    for host in ["a.example", "a.example", "a.example", "b.example"]:
        try:
            await fetcher.get_json(f"https://{host}/jwks", purpose="t")
            outcomes.append("ok")
        except OutboundRefused as exc:
            outcomes.append(exc.outcome)
    assert outcomes == ["ok", "ok", "rate_limited", "ok"]
    assert hosts == ["a.example", "a.example", "b.example"]
    await fetcher.aclose()


def test_the_token_bucket_refills() -> None:
    limiter = HostRateLimiter(rate=1000.0, burst=1)
    assert limiter.allow("h")
    limiter._buckets["h"] = (0.0, limiter._buckets["h"][1] - 1.0)  # one second ago, empty
    assert limiter.allow("h")
    assert HostRateLimiter(rate=0.0, burst=1).allow("h")  # 0: no limit


async def test_a_refusal_is_counted_and_logged_with_its_purpose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logs: list[dict[str, Any]] = []

    class Recorder:  # structlog may have cached its logger already (cache_logger_on_first_use)
        def warning(self, event: str, **fields: Any) -> None:
            logs.append({"event": event, **fields})

    monkeypatch.setattr(fetcher_module, "log", Recorder())
    before = counted("client_jwks", "refused_url")
    outcome = await outcome_of(OutboundFetcher(), "https://169.254.169.254/", "client_jwks")
    assert outcome == "refused_url"
    assert counted("client_jwks", "refused_url") == before + 1
    assert logs == [
        {
            "event": "outbound_fetch_refused",
            "purpose": "client_jwks",
            "host": "169.254.169.254",
            "outcome": "refused_url",
            "reason": "host 169.254.169.254 is link-local",
        }
    ]


def test_the_http_client_finds_its_event_loop_without_a_failed_import() -> None:
    """httpcore asks ``sniffio`` at every lock and connection it creates; when sniffio is missing
    each ask is a failed import (~90 us, several per request): it is a dependency of ours."""
    import sys

    from httpcore._synchronization import current_async_library

    async def ask() -> str:
        return current_async_library()

    assert asyncio.run(ask()) == "asyncio"
    assert "sniffio" in sys.modules, "sniffio is not importable: every ask was a failed import"


async def test_a_kept_alive_connection_the_server_closed_is_not_reused(
    loopback: Callable[..., Awaitable[Loopback]],
) -> None:
    """The server answers with keep-alive, then closes the idle connection (a keep-alive timeout):
    the next request sees the connection readable (its close) and opens another, instead of writing
    to a dead one and failing."""
    closed = asyncio.Event()

    async def keep_alive_then_close(writer: asyncio.StreamWriter, state: Loopback) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    server = await loopback(keep_alive_then_close)
    fetcher = OutboundFetcher(OutboundPolicy.development())
    try:
        assert await fetcher.get_json(server.url, purpose="t") == {}
        await asyncio.wait_for(closed.wait(), 5)
        closed.clear()
        assert await fetcher.get_json(server.url, purpose="t") == {}
    finally:
        await fetcher.aclose()
    assert server.connections == 2
