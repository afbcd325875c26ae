"""Redirect URI matching (RFC 6749 §3.1.2.3, RFC 9700 §4.1.3): simple string comparison against the
registered URIs. The one exception is RFC 8252 §7.3: for a registered ``http`` loopback IP URI
(127.0.0.1 or [::1]) the port may differ, because native apps bind an ephemeral port.

Nothing is normalised: ``/CB``, ``/cb/../x``, ``%2e``, an added query, userinfo or a fragment all
fail to match, and a non-matching URI is never redirected to.
"""

from __future__ import annotations

import re

#: scheme, loopback host, optional port, rest (path and query). No userinfo can slip in: the host
#: must be followed by ``:digits`` or the start of the path, nothing else. Used with ``fullmatch``
#: and DOTALL: ``$`` would let a trailing newline through (``/callback\n`` matching ``/callback``).
_LOOPBACK = re.compile(r"http://(127\.0\.0\.1|\[::1\])(?::([0-9]{1,5}))?([/?].*)?", re.DOTALL)


def _without_port(uri: str) -> tuple[str, str] | None:
    """(host, rest) of a loopback IP http URI; None for anything else."""
    match = _LOOPBACK.fullmatch(uri)
    if match is None or "#" in uri:
        return None
    port = match.group(2)
    if port is not None and not 0 < int(port) < 65536:
        return None
    return match.group(1), match.group(3) or ""


def match_redirect_uri(requested: str, registered: tuple[str, ...] | list[str]) -> str | None:
    """The registered URI that ``requested`` matches, or None."""
    if requested in registered:
        return requested
    wanted = _without_port(requested)
    if wanted is None:
        return None
    for uri in registered:
        if _without_port(uri) == wanted:
            return uri
    return None
