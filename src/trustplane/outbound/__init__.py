"""Outbound HTTP: one guarded fetcher for every request trustplane (and its PEP SDK) makes.
See :mod:`trustplane.outbound.fetcher` for the rules."""

from trustplane.outbound.addresses import (
    Resolver,
    host_problem,
    is_local_name,
    literal_address,
    refusal,
)
from trustplane.outbound.errors import OutboundError, OutboundRefused
from trustplane.outbound.fetcher import (
    Fetched,
    HostRateLimiter,
    OutboundFetcher,
    OutboundPolicy,
)

__all__ = [
    "Fetched",
    "HostRateLimiter",
    "OutboundError",
    "OutboundFetcher",
    "OutboundPolicy",
    "OutboundRefused",
    "Resolver",
    "host_problem",
    "is_local_name",
    "literal_address",
    "refusal",
]
