"""SIEM export (``trustplane audit tail``): RFC 5424 messages with octet-counting framing, the cursor,
and a real ``trustplane audit tail --follow`` killed with SIGKILL mid-stream and restarted from its
cursor against a real TCP syslog receiver: every ledger entry arrives, none twice."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import itertools
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.audit.ledger_helpers import append, event
from tests.conftest import KEK, wait_until
from trustplane.app import Services
from trustplane.audit import siem
from trustplane.audit.store import StoredEntry, read_state
from trustplane.audit_events import AuditEventType

TRUSTPLANE = str(Path(sys.executable).with_name("trustplane"))
LOOPBACK = ipaddress.ip_address("127.0.0.1")

#: RFC 5424 §6: HEADER SP STRUCTURED-DATA SP MSG (our messages always have SD and MSG).
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 "
    r"(?P<ts>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z) "
    r"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    r"(?P<sd>\[(?:[^\]\\]|\\.)*\]) \ufeff(?P<msg>.*)$",
    re.DOTALL,
)
SD_PARAM = re.compile(r'([^= \]"]{1,32})="((?:[^"\\\]]|\\.)*)"')


def _parse(message: bytes) -> dict[str, Any]:
    found = RFC5424.match(message.decode())
    assert found, message
    params: dict[str, list[str]] = {}
    sd = found["sd"]
    assert sd.startswith(f"[{siem.SD_ID} ")
    for name, value in SD_PARAM.findall(sd[len(siem.SD_ID) + 2 : -1]):
        params.setdefault(name, []).append(re.sub(r"\\(.)", r"\1", value))
    return {**found.groupdict(), "params": params, "body": orjson.loads(found["msg"])}


class Receiver:
    """A syslog receiver over TCP (optionally TLS): octet-counted frames (RFC 6587 §3.4.1), one
    connection after another; an incomplete frame at the end of a connection is discarded."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tls = tls
        self.frames: list[bytes] = []
        self.incomplete = 0
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
            with conn:
                self._read(conn)

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except (OSError, ssl.SSLError):
                chunk = b""
            if not chunk:
                if buffer:
                    self.incomplete += 1
                return
            buffer += chunk
            while True:
                length, space, rest = buffer.partition(b" ")
                if not space:
                    break
                assert length.isdigit(), buffer[:40]
                if len(rest) < int(length):
                    break
                self.frames.append(rest[: int(length)])
                buffer = rest[int(length) :]

    def indices(self) -> list[int]:
        return [int(_parse(frame)["params"]["seq"][0]) for frame in list(self.frames)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _entry(index: int, **fields: Any) -> StoredEntry:
    body = {"type": "oauth:token:issued", "time": 1_764_672_000_123, "event_id": "e1", **fields}
    return StoredEntry(index, orjson.dumps(body).decode(), b"h", '{"n":1}', b"s")


# --------------------------------------------------------------------------- the format


def test_a_message_is_rfc5424_with_the_event_in_structured_data_and_msg() -> None:
    item = _entry(
        7,
        client_id='cl"ient]\\x',
        scopes=["trade:read", "trade:write"],
        subject=None,
        decision="allow",
    )
    parsed = _parse(siem.syslog(item, "as.example"))
    assert parsed["pri"] == str(10 * 8 + 5)  # authpriv.notice
    assert parsed["ts"] == "2025-12-02T10:40:00.123Z"
    assert datetime.datetime.fromisoformat(parsed["ts"]).timestamp() == 1_764_672_000.123
    assert (parsed["host"], parsed["app"], parsed["procid"], parsed["msgid"]) == (
        "as.example",
        "trustplane",
        "-",
        "oauth:token:issued",
    )
    params = parsed["params"]
    assert params["seq"] == ["7"]
    assert params["client_id"] == ['cl"ient]\\x']  # escaped on the wire, the same value back
    assert params["scopes"] == ["trade:read", "trade:write"]  # a list: the PARAM-NAME repeated
    assert "subject" not in params  # absent, not "None"
    assert parsed["body"]["ledger_index"] == 7
    assert parsed["body"]["payload"] == {"n": 1}


@pytest.mark.parametrize(
    ("fields", "severity"),
    [
        ({"decision": "deny"}, 4),
        ({"type": "users:login:failed"}, 4),
        ({"type": "oauth:token:refused"}, 4),
        ({"type": "surveillance:alert:raised", "reason": "issuance.spike"}, 4),
        ({"type": "policy:decision:allowed", "decision": "allow"}, 5),
    ],
)
def test_refusals_and_denies_are_warnings(fields: dict[str, Any], severity: int) -> None:
    parsed = _parse(siem.syslog(_entry(0, **fields), "h"))
    assert int(parsed["pri"]) == 10 * 8 + severity


def test_octet_counting_counts_bytes_not_characters() -> None:
    message = siem.syslog(_entry(0, subject="Zürich"), "h")
    framed = siem.octet_counted(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(message)
    assert len(message) > len(message.decode())


def test_jsonl_is_one_sorted_object_per_line_with_its_index() -> None:
    line = siem.jsonl(_entry(3))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert orjson.loads(line)["ledger_index"] == 3


def test_a_purged_payload_is_null() -> None:
    item = StoredEntry(0, '{"type":"oauth:token:issued","time":1}', b"h", None, None)
    assert siem.record(item)["payload"] is None


@pytest.mark.parametrize(
    "url",
    [
        "udp://127.0.0.1:514",
        "tcp://127.0.0.1",
        "tcp://:514",
        "tcp://127.0.0.1:99999",
        "tcp://127.0.0.1:514/path",
        "tcp://u@127.0.0.1:514",
        "127.0.0.1:514",
    ],
)
def test_only_tcp_and_tls_urls_with_a_port_are_accepted(url: str) -> None:
    with pytest.raises(siem.SiemError, match="must be tcp://HOST:PORT or tls://HOST:PORT"):
        siem.parse_syslog_url(url)


def test_syslog_urls() -> None:
    assert siem.parse_syslog_url("tcp://127.0.0.1:6514") == ("127.0.0.1", 6514, False)
    assert siem.parse_syslog_url("tls://siem.example:6514") == ("siem.example", 6514, True)


# --------------------------------------------------------------------------- the cursor


def test_the_cursor_round_trips_and_refuses_another_log(tmp_path: Path) -> None:
    cursor = siem.Cursor(tmp_path / "c.json", "as.example/audit")
    assert cursor.load() is None
    cursor.save(42)
    assert cursor.load() == 42
    assert not (tmp_path / "c.json.tmp").exists()
    with pytest.raises(siem.SiemError, match=r"is for the log 'as\.example/audit'"):
        siem.Cursor(tmp_path / "c.json", "other/audit").load()


@pytest.mark.parametrize(
    "content", [b"", b"[]", b'{"next_index": -1}', b'{"next_index": "3"}', b'{"next_index": true}']
)
def test_a_damaged_cursor_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "c.json").write_bytes(content)
    with pytest.raises(siem.SiemError, match="cursor file"):
        siem.Cursor(tmp_path / "c.json", "o").load()


def test_a_cursor_in_a_missing_directory_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    with pytest.raises(siem.SiemError, match=r"directory .* does not exist"):
        siem.Cursor(tmp_path / "nowhere" / "c.json", "o").load()


async def test_a_closed_output_ends_the_stream_without_a_traceback() -> None:
    def closed(_data: bytes) -> None:
        raise BrokenPipeError

    with pytest.raises(siem.SiemError, match="the output was closed"):
        await siem.StreamDestination(closed, lambda: None).send([b"x"])


# --------------------------------------------------------------------------- the stream


class Collect:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, chunks: Any) -> None:
        self.sent.extend(chunks)

    async def close(self) -> None:
        return None


async def test_tail_delivers_from_the_start_and_saves_the_cursor(
    services: Services, tmp_path: Path
) -> None:
    base = await _add(services, 0, 25)
    cursor = siem.Cursor(tmp_path / "cursor", services.settings.audit_origin)
    out = Collect()
    tail = siem.Tail(services.db, out, siem.jsonl, cursor, batch=10)
    assert await tail.run(base + 5) == base + 25
    lines = [orjson.loads(line) for line in out.sent]
    assert [line["ledger_index"] for line in lines] == list(range(base + 5, base + 25))
    assert [line["payload"]["n"] for line in lines] == list(range(5, 25))
    assert cursor.load() == base + 25


async def test_a_cursor_past_the_end_of_the_log_is_refused(services: Services) -> None:
    size = await _add(services, 0, 0)
    with pytest.raises(siem.SiemError, match=f"the log has only {size} entries"):
        await siem.Tail(services.db, Collect(), siem.jsonl).run(size + 1)


# --------------------------------------------------------------------------- the CLI, end to end


def _env(services: Services) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    env.update(
        TRUSTPLANE_DATABASE_URL=services.settings.effective_database_url,
        TRUSTPLANE_DATA_DIR=str(services.settings.data_dir),
        TRUSTPLANE_KEY_ENCRYPTION_KEY=KEK,
        TRUSTPLANE_ISSUER=services.settings.issuer,
        TRUSTPLANE_LOG_LEVEL="warning",
    )
    return env


def _tail(services: Services, *args: str) -> subprocess.Popen[bytes]:
    """A running tail; what it prints goes to ``tail.log`` in the data directory."""
    with (services.settings.data_dir / "tail.log").open("ab") as log:
        return subprocess.Popen(
            [TRUSTPLANE, "audit", "tail", *args],
            env=_env(services),
            stdout=log,
            stderr=log,
        )


async def _add(services: Services, first: int, count: int) -> int:
    """Append and integrate events ``first..first+count``; return the log's size before them (the
    server's own entries come first: its log key, its policy)."""
    await services.ledger.integrate_all()
    async with services.db.read() as conn:
        before = (await read_state(conn) or (0, b""))[0]
    if count:
        await append(services.db, [event(i) for i in range(first, first + count)])
        await services.ledger.integrate_all()
    return before


def _saved(cursor: Path) -> int | None:
    """The cursor file's next index (None: not written yet, or caught mid-replace)."""
    try:
        return int(orjson.loads(cursor.read_bytes())["next_index"])
    except (OSError, ValueError, KeyError):
        return None


async def _until(predicate: Any, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.e2e
async def test_a_killed_follow_resumes_from_its_cursor_without_gap_or_duplicate(
    services: Services, receiver: Receiver, tmp_path: Path
) -> None:
    cursor = tmp_path / "siem.cursor"
    args = ("--follow", "--poll", "0.05", "--cursor-file", str(cursor))
    args += ("--syslog", f"tcp://127.0.0.1:{receiver.port}")
    base = await _add(services, 0, 300)
    tail = _tail(services, *args, "--from", str(base))
    try:
        await _until(lambda: len(receiver.frames) >= 300, "the backlog")
        for batch in range(3):  # the stream goes on while entries keep coming
            await _add(services, 300 + 50 * batch, 50)
            await _until(lambda n=350 + 50 * batch: len(receiver.frames) >= n, "new entries")
        await asyncio.sleep(0.3)  # caught up: the follower is polling
        tail.send_signal(signal.SIGKILL)
        tail.wait(10)
        await _add(services, 450, 250)  # written while nobody is streaming
        tail = _tail(services, *args)
        await _until(lambda: len(receiver.frames) >= 700, "the entries after the restart")
        await _add(services, 700, 10)
        await _until(lambda: len(receiver.frames) >= 710, "the last entries")
        # the cursor is saved after the batch is sent: the receiver may have it first
        await _until(lambda: _saved(cursor) == base + 710, "the cursor after the last entries")
    finally:
        tail.kill()
        tail.wait(10)
    assert receiver.indices() == list(range(base, base + 710))  # in order, no gap, no duplicate
    assert receiver.connections == 2
    assert orjson.loads(cursor.read_bytes())["next_index"] == base + 710
    events = [_parse(frame)["body"] for frame in receiver.frames]
    assert {e["type"] for e in events} == {AuditEventType.TOKEN_ISSUED.value}
    assert [e["payload"]["n"] for e in events] == list(range(710))


@pytest.mark.e2e
async def test_a_kill_during_a_backlog_never_skips(
    services: Services, receiver: Receiver, tmp_path: Path
) -> None:
    """Killed while sending: at least once. A repeat can only be the batch whose cursor was not
    saved yet (its frames carry their index for the receiver to drop); an interrupted frame is
    incomplete at the end of the connection and is discarded."""
    cursor = tmp_path / "siem.cursor"
    args = ("--cursor-file", str(cursor), "--syslog", f"tcp://127.0.0.1:{receiver.port}")
    base = await _add(services, 0, 3000)
    tail = _tail(services, "--follow", "--from", str(base), *args)
    try:
        await _until(lambda: len(receiver.frames) >= 700, "part of the backlog")
        tail.send_signal(signal.SIGKILL)
        tail.wait(10)
    finally:
        tail.kill()
    done = await asyncio.to_thread(
        subprocess.run,
        [TRUSTPLANE, "audit", "tail", *args],
        env=_env(services),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"delivered up to ledger index {base + 3000}".encode() in done.stderr
    seen = receiver.indices()
    assert sorted(set(seen)) == list(range(base, base + 3000))  # nothing skipped
    repeats = len(seen) - 3000
    assert 0 <= repeats <= 200  # at most one batch (siem.Tail.batch)
    first_repeat = next((i for i, (a, b) in enumerate(itertools.pairwise(seen)) if b <= a), None)
    if first_repeat is not None:  # the repeated entries are exactly the unsaved batch, in order
        resumed = seen[first_repeat + 1]
        assert seen[first_repeat + 1 :] == list(range(resumed, base + 3000))


async def test_tail_writes_jsonl_to_stdout_from_an_index(services: Services) -> None:
    base = await _add(services, 0, 12)
    done = await asyncio.to_thread(
        subprocess.run,
        [TRUSTPLANE, "audit", "tail", "--from", str(base + 4)],
        env=_env(services),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [orjson.loads(line)["ledger_index"] for line in lines] == list(
        range(base + 4, base + 12)
    )
    assert [orjson.loads(line)["payload"]["n"] for line in lines] == list(range(4, 12))


async def test_tail_writes_syslog_lines_to_stdout(services: Services) -> None:
    base = await _add(services, 0, 3)
    done = await asyncio.to_thread(
        subprocess.run,
        [TRUSTPLANE, "audit", "tail", "--format", "syslog", "--from", str(base)],
        env=_env(services),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    parsed = [_parse(line) for line in done.stdout.splitlines()]
    assert [int(p["params"]["seq"][0]) for p in parsed] == [base, base + 1, base + 2]
    assert {p["host"] for p in parsed} == {"127.0.0.1"}  # the issuer's host


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "xml"], "--format must be jsonl or syslog"),
        (["--format", "jsonl", "--syslog", "tcp://127.0.0.1:1"], "--format must be syslog"),
        (["--syslog", "udp://127.0.0.1:514"], "must be tcp://HOST:PORT or tls://HOST:PORT"),
        (["--syslog", "tcp://127.0.0.1:1", "--syslog-ca", "ca.pem"], "is for a tls:// receiver"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    done = subprocess.run(
        [TRUSTPLANE, "audit", "tail", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr


async def test_from_conflicts_with_a_saved_cursor(services: Services, tmp_path: Path) -> None:
    cursor = siem.Cursor(tmp_path / "c", services.settings.audit_origin)
    cursor.save(0)
    done = await asyncio.to_thread(
        subprocess.run,
        [TRUSTPLANE, "audit", "tail", "--from", "1", "--cursor-file", str(cursor.path)],
        env=_env(services),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "--from conflicts with the cursor saved in" in done.stderr


async def test_an_unreachable_receiver_exits_1(services: Services) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    done = await asyncio.to_thread(
        subprocess.run,
        [TRUSTPLANE, "audit", "tail", "--syslog", f"tcp://127.0.0.1:{port}"],
        env=_env(services),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot connect to the syslog receiver" in done.stderr


def _tls_files(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siem.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(LOOPBACK)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "siem.pem", tmp_path / "siem.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.e2e
async def test_tls_delivery_verifies_the_receiver(services: Services, tmp_path: Path) -> None:
    cert, key = _tls_files(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls_receiver = Receiver(context)
    try:
        base = await _add(services, 0, 20)
        url = f"tls://127.0.0.1:{tls_receiver.port}"
        run = [TRUSTPLANE, "audit", "tail", "--syslog", url, "--from", str(base)]
        untrusted = await asyncio.to_thread(
            subprocess.run, run, env=_env(services), capture_output=True, text=True, timeout=60
        )
        assert untrusted.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        trusted = await asyncio.to_thread(
            subprocess.run,
            [*run, "--syslog-ca", str(cert)],
            env=_env(services),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert trusted.returncode == 0, trusted.stderr
        wait_until(lambda: len(tls_receiver.frames) >= 20, 10, "the TLS frames")
        assert tls_receiver.indices() == list(range(base, base + 20))
    finally:
        tls_receiver.close()
