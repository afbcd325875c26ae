"""Helpers the benchmark scripts share: a free loopback port and waiting for a server to answer.

The scripts run as ``python bench/<name>.py``, so this module is imported as ``_common``.
"""

from __future__ import annotations

import socket
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server at {url} did not become ready")
