"""Which addresses an outbound request may reach: public unicast addresses only.

The rule (trust boundary "one guarded fetcher"): a host is refused when ANY address it resolves to is
loopback, private (RFC 1918, ULA), link-local (169.254/16 holds the cloud metadata services, fe80::/10),
shared (100.64/10, RFC 6598), multicast, reserved, unspecified, documentation/benchmark ranges, or not
globally routable for any other reason (``ipaddress``'s ``is_global``), including the same addresses
written in IPv6 clothing: IPv4-mapped (``::ffff:127.0.0.1``), NAT64 (64:ff9b::/96, 64:ff9b:1::/48),
6to4 (2002::/16). Loopback alone can be let through by an explicit development setting.

A URL's host may itself be an address, written in any of the forms ``inet_aton`` accepts (``127.1``,
``2130706433``, ``0x7f.0.0.1``): :func:`literal_address` reads them all, so none is mistaken for a
name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable

from trustplane.settings import is_loopback_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``resolver(host, port)`` -> the addresses ``host`` resolves to (strings). Injected in tests.
Resolver = Callable[[str, int], Awaitable[list[str]]]

SHARED = ipaddress.IPv4Network("100.64.0.0/10")
NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
#: Names that only ever mean "this machine" or "this site" (RFC 6761 §6.3, RFC 6762, RFC 8375).
LOCAL_NAMES = ("localhost", "localhost.localdomain")
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host names literally (``[::1]``, ``10.0.0.1``, ``2130706433``), else None."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def is_local_name(host: str) -> bool:
    """A name that can never be a public host: ``localhost``, ``*.local``, ``*.internal``, ..."""
    name = host.lower().rstrip(".")
    return name in LOCAL_NAMES or name.endswith(LOCAL_SUFFIXES)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why ``address`` may not be contacted, or None when it is a public unicast address (or a
    loopback address and ``allow_loopback``, the development setting)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = refusal(embedded, allow_loopback=allow_loopback)
            return f"{reason} (embedded in {address})" if reason else None
    if address.is_loopback:
        return None if allow_loopback else "loopback"
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in SHARED, "shared (100.64/10)"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (not address.is_global, "not globally routable"),
    )
    return next((reason for refused, reason in checks if refused), None)


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer for ``host`` (every address, IPv4 and IPv6, in its order)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def host_problem(host: str, *, allow_loopback: bool = False) -> str | None:
    """Why a URL host can never be fetched, known without resolving it (registration-time checks and
    the fetcher's first check): an address literal that is not public, or a local name. Loopback
    passes when ``allow_loopback`` (development). A public-looking name is checked when fetched."""
    if allow_loopback and is_loopback_host(host):
        return None
    literal = literal_address(host)
    if literal is not None:
        reason = refusal(literal, allow_loopback=allow_loopback)
        return f"host {host} is {reason}" if reason else None
    return f"host {host} is a local name" if is_local_name(host) else None
