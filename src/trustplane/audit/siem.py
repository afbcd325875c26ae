"""SIEM export: the ledger's entries, in ledger order, as JSON lines or RFC 5424 syslog messages.

The ledger index is the stream's sequence number: the sequencer gives integrated entries gap-free,
increasing indices, so "deliver from index N" is all a reader needs to resume. Entries still pending
integration are not streamed yet; they follow as soon as the sequencer integrates them (a running
server does so within ``TRUSTPLANE_AUDIT_INTEGRATE_INTERVAL``).

Delivery is at least once, made as close to exactly once as a receiver without acknowledgements
allows: a batch is written (and drained to the socket or flushed to stdout), then the index after its
last entry is saved to the cursor file by an atomic rename (:class:`Cursor`). A process killed before
the rename repeats that batch on restart, never skips one; killed during the rename window after a
complete send, the repeat is the only possible duplicate, and every message carries its index
(``ledger_index``, syslog MSGID ``seq``) for a receiver to drop it. Killed in the middle of a send,
the receiver sees an incomplete octet-counted frame at the end of the connection (RFC 6587 §3.4.1),
which it discards.

Syslog (RFC 5424): facility ``authpriv`` (10), severity ``warning`` for refusals and denies, else
``notice``; TIMESTAMP the event's time; APP-NAME ``trustplane``; MSGID the event type; one structured
data element ``trustplane@32473`` (32473 is the private enterprise number RFC 5612 reserves for
documentation) carrying the envelope fields; MSG the whole event as JSON (UTF-8, with the BOM).
Over TCP and TLS (RFC 5425) each message is framed by octet counting (RFC 6587 §3.4.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from trustplane.audit import store
from trustplane.audit.sink import event_body
from trustplane.audit.store import StoredEntry
from trustplane.storage.db import Database

SD_ID = "trustplane@32473"
APP_NAME = "trustplane"
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
BOM = "\ufeff"
CONNECT_TIMEOUT = 10.0
#: Envelope fields carried as SD-PARAMs (the payload stays in MSG only).
SD_FIELDS = (
    "event_id",
    "type",
    "issuer",
    "subject",
    "client_id",
    "actor_chain",
    "partner",
    "audience",
    "scopes",
    "mandate_id",
    "mandate_version",
    "transaction_id",
    "correlation_id",
    "jti",
    "decision",
    "reason",
    "reason_ids",
    "policy_bundle_version",
    "service",
    "region",
    "purpose",
)


class SiemError(Exception):
    """The export cannot go on as asked (bad cursor, unusable destination); the message says why."""


# --------------------------------------------------------------------------- formats


def record(item: StoredEntry) -> dict[str, Any]:
    """One entry as the SIEM sees it: the event (payload back in, None once purged) and its index."""
    body = event_body(item.entry, item.payload)
    body["ledger_index"] = item.index
    return body


def jsonl(item: StoredEntry) -> bytes:
    return orjson.dumps(record(item), option=orjson.OPT_SORT_KEYS) + b"\n"


def _severity(body: dict[str, Any]) -> int:
    refused = body.get("decision") == "deny" or str(body.get("type", "")).endswith(
        (":refused", ":denied", ":failed", ":reused", ":locked", ":raised")
    )
    return SEVERITY_WARNING if refused else SEVERITY_NOTICE


def _timestamp(ms: int) -> str:
    """RFC 5424 §6.2.3 TIMESTAMP: RFC 3339 in UTC with milliseconds."""
    seconds, millis = divmod(int(ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _header_token(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces (RFC 5424 §6), at most ``limit``, or NILVALUE."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def _param_value(value: Any) -> str:
    """RFC 5424 §6.3.3: '"', '\\' and ']' are escaped with a backslash."""
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def structured_data(body: dict[str, Any]) -> str:
    params = [f'seq="{body["ledger_index"]}"']
    for name in SD_FIELDS:
        value = body.get(name)
        values = value if isinstance(value, list) else [value]
        params += [f'{name}="{_param_value(v)}"' for v in values if v is not None]
    return f"[{SD_ID} {' '.join(params)}]"


def syslog(item: StoredEntry, hostname: str) -> bytes:
    """One RFC 5424 SYSLOG-MSG (no framing)."""
    body = record(item)
    pri = FACILITY_AUTHPRIV * 8 + _severity(body)
    header = " ".join(
        (
            f"<{pri}>1",
            _timestamp(body.get("time") or 0),
            _header_token(hostname, 255),
            APP_NAME,
            "-",
            _header_token(str(body.get("type", "")), 32),
        )
    )
    msg = BOM + orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
    return f"{header} {structured_data(body)} {msg}".encode()


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 §3.4.1: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode() + b" " + message


# --------------------------------------------------------------------------- cursor


@dataclass(frozen=True, slots=True)
class Cursor:
    """The next ledger index to deliver, kept in a small JSON file with the log's origin (a cursor
    of another log is refused). Saved by writing a temporary file and renaming it over the old one,
    so a reader sees the old or the new cursor, never a torn one; then fsynced for power loss."""

    path: Path
    origin: str

    def load(self) -> int | None:
        """The saved index, or None when there is no cursor file yet (its directory must exist:
        the first save must not fail after a batch was delivered)."""
        if not self.path.parent.is_dir():
            raise SiemError(f"the cursor file's directory {self.path.parent} does not exist")
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SiemError(f"cannot read the cursor file {self.path}: {exc}") from None
        index = data.get("next_index") if isinstance(data, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise SiemError(f"the cursor file {self.path} holds no next_index")
        if data.get("origin") != self.origin:
            raise SiemError(
                f"the cursor file {self.path} is for the log {data.get('origin')!r}, "
                f"not {self.origin!r}"
            )
        return index

    def save(self, next_index: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = orjson.dumps({"next_index": next_index, "origin": self.origin})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # durability across power loss, not correctness
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------- destinations


class Destination(Protocol):
    """Where a batch goes; ``send`` returns once the bytes are handed to the OS (flushed, drained)."""

    async def send(self, chunks: Sequence[bytes]) -> None: ...

    async def close(self) -> None: ...


class StreamDestination:
    """A binary stream (stdout): each message ends with a newline."""

    def __init__(self, write: Callable[[bytes], Any], flush: Callable[[], Any]) -> None:
        self._write, self._flush = write, flush

    async def send(self, chunks: Sequence[bytes]) -> None:
        try:
            self._write(b"".join(c if c.endswith(b"\n") else c + b"\n" for c in chunks))
            self._flush()
        except BrokenPipeError:  # the reader went away (`| head`): this batch was not delivered
            raise SiemError("the output was closed") from None

    async def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._flush()


class SyslogDestination:
    """A syslog receiver over TCP (``tcp://host:port``) or TLS (``tls://host:port``, RFC 5425),
    octet-counting framing (RFC 6587 §3.4.1)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    @classmethod
    async def connect(
        cls, url: str, ssl_context: ssl.SSLContext | None = None
    ) -> SyslogDestination:
        host, port, tls = parse_syslog_url(url)
        context = (ssl_context or ssl.create_default_context()) if tls else None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _reader, writer = await asyncio.open_connection(host, port, ssl=context)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise SiemError(f"cannot connect to the syslog receiver {url}: {exc}") from None
        return cls(writer)

    async def send(self, chunks: Sequence[bytes]) -> None:
        self._writer.write(b"".join(octet_counted(c) for c in chunks))
        try:
            await self._writer.drain()
        except OSError as exc:
            raise SiemError(f"the syslog receiver closed the connection: {exc}") from None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()


def parse_syslog_url(url: str) -> tuple[str, int, bool]:
    """``tcp://host:port`` or ``tls://host:port`` -> (host, port, tls)."""
    wrong = SiemError(f"--syslog must be tcp://HOST:PORT or tls://HOST:PORT, not {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise wrong from None
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None:
        raise wrong
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise wrong
    return parts.hostname, port, parts.scheme == "tls"


# --------------------------------------------------------------------------- the stream


@dataclass
class Tail:
    """Streams integrated entries from ``start`` to ``destination``; with ``follow``, keeps polling
    for new ones every ``poll`` seconds until cancelled. ``cursor``: saved after every batch."""

    db: Database
    destination: Destination
    encode: Callable[[StoredEntry], bytes]
    cursor: Cursor | None = None
    follow: bool = False
    poll: float = 0.5
    batch: int = 200

    async def run(self, start: int) -> int:
        """Deliver from ``start``; return the next index (everything before it was delivered)."""
        async with self.db.read() as conn:
            size = await _tree_size(conn)
        if start > size:
            raise SiemError(f"the cursor is at {start} but the log has only {size} entries")
        next_index = start
        while True:
            async with self.db.read() as conn:
                size = await _tree_size(conn)
                end = min(size, next_index + self.batch)
                items = await store.entries_range(conn, next_index, end) if end > next_index else []
            if items:
                next_index = await self._deliver(items, next_index)
                continue
            if not self.follow:
                return next_index
            await asyncio.sleep(self.poll)

    async def _deliver(self, items: list[StoredEntry], expected: int) -> int:
        if items[0].index != expected or items[-1].index != expected + len(items) - 1:
            raise SiemError(f"the ledger has a gap after index {expected}")  # never: fail closed
        await self.destination.send([self.encode(item) for item in items])
        next_index = items[-1].index + 1
        if self.cursor is not None:
            self.cursor.save(next_index)
        return next_index


async def _tree_size(conn: Any) -> int:
    state = await store.read_state(conn)
    return state[0] if state else 0
