"""The ``htu`` comparison of RFC 9449 §4.3 step 9: the URI the proof names against the request's URI,
both without query and fragment, after RFC 3986 §6.2.2 syntax-based and §6.2.3 scheme-based
normalization (which §4.3 says servers SHOULD apply "to reduce the likelihood of false negatives").

What is normalized: scheme and host case, the default port (``:443`` for https, ``:80`` for http) and
an empty port, percent-encoding (hex digits upper-cased, unreserved characters decoded, characters
that may not appear in a path encoded as UTF-8), dot segments, and an empty path (``/``). Nothing else:
``%2F`` stays distinct from ``/``, a trailing slash is significant, and only http and https are URIs
a request can be made to.
"""

from __future__ import annotations

import functools
import re
import string
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URI_LENGTH = 4096
_HEX = frozenset(string.hexdigits)
#: RFC 3986 §2.3.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
#: RFC 3986 §3.3 pchar plus "/": unreserved, sub-delims, ":" and "@".
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


class HtuError(ValueError):
    """The value is not an absolute http(s) URI that a request could have been sent to."""


@functools.lru_cache(maxsize=4096)
def normalize_htu(uri: str) -> str:
    """``scheme://host[:port]/path`` in normal form; query and fragment dropped. Raises
    :class:`HtuError`. Cached: a server sees few distinct URIs, and clients name them the same way."""
    if len(uri) > MAX_URI_LENGTH:
        raise HtuError("URI too long")
    if _CONTROL_OR_SPACE.search(uri):
        # urlsplit would silently strip tabs and newlines: refuse them instead.
        raise HtuError("URI contains whitespace or control characters")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        raise HtuError("malformed URI authority") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise HtuError("the URI must be absolute and use http or https")
    if "@" in parts.netloc:
        raise HtuError("the URI must not carry user information")
    host = parts.hostname
    if not host:
        raise HtuError("the URI has no host")
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{remove_dot_segments(_normalize_percent(parts.path)) or '/'}"


def _normalize_percent(path: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(path):
        ch = path[i]
        if ch == "%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise HtuError("malformed percent-encoding in the URI path")
            decoded = chr(int(pair, 16))
            out.append(decoded if decoded in _UNRESERVED else f"%{pair.upper()}")
            i += 3
            continue
        out.append(ch if ch in _PATH_SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        i += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4."""
    output: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./") or path.startswith("/./"):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if output:
                output.pop()
        elif path == "/..":
            path = "/"
            if output:
                output.pop()
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end < 0 else end
            output.append(path[:end])
            path = path[end:]
    return "".join(output)
