"""A TCP proxy in front of PostgreSQL that counts round trips and bytes (no pg_stat_statements on the
shared server, and statement logs are not ours to read).

A round trip is a frontend message the client must wait on: ``Sync`` (the end of an extended-protocol
exchange: Parse/Bind/Execute... Sync, one wait for ReadyForQuery) or ``Query`` (simple protocol).
SSL and GSS encryption requests are refused by the proxy itself (the client falls back to plaintext,
as libpq's and asyncpg's default ``prefer`` does), so the stream stays readable.

``messages`` counts every frontend message by type: ``Execute`` (one statement run through the
extended protocol), ``Parse`` (a statement prepared: with asyncpg's statement cache, only the first
time a text is seen on a connection, or an unnamed one-off), ``Query`` (a simple-protocol statement:
``BEGIN``, ``COMMIT``...).
"""

from __future__ import annotations

import asyncio
import collections
import struct
import threading

SSL_REQUEST, GSS_REQUEST = 80877103, 80877104
#: The frontend message types worth counting (PostgreSQL protocol 3, "Message Formats").
MESSAGES = {b"P": "parse", b"B": "bind", b"E": "execute", b"Q": "query", b"S": "sync"}


class CountingProxy:
    def __init__(self, host: str, port: int, listen_port: int) -> None:
        self.host, self.port, self.listen_port = host, port, listen_port
        self.round_trips = self.bytes_up = self.bytes_down = 0
        self.messages: collections.Counter[str] = collections.Counter()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def snapshot(self) -> dict[str, int]:
        """Round trips, the counted messages and the bytes each way, so far."""
        counts = {name: self.messages[name] for name in MESSAGES.values()}
        return {"round_trips": self.round_trips, **counts, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down}  # fmt: skip

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.listen_port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # the startup phase: untyped messages
                length = struct.unpack("!I", await reader.readexactly(4))[0]
                body = await reader.readexactly(length - 4)
                code = struct.unpack("!I", body[:4])[0]
                if code in (SSL_REQUEST, GSS_REQUEST):
                    writer.write(b"N")
                    continue
                break
            up_r, up_w = await asyncio.open_connection(self.host, self.port)
            up_w.write(struct.pack("!I", length) + body)
            await asyncio.gather(self._frontend(reader, up_w), self._backend(up_r, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _frontend(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(5)
                kind, length = head[:1], struct.unpack("!I", head[1:])[0]
                body = await reader.readexactly(length - 4)
                if kind in (b"S", b"Q"):
                    self.round_trips += 1
                name = MESSAGES.get(kind)
                if name is not None:
                    self.messages[name] += 1
                self.bytes_up += 5 + len(body)
                upstream.write(head + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            upstream.close()

    async def _backend(self, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await upstream.read(65536):
                self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
