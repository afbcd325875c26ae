"""Why an outbound request gave no usable answer. ``outcome`` is the metric label; the message says
why without the URL (each caller names the URL in its own error)."""

from __future__ import annotations


class OutboundError(Exception):
    """The request failed or its answer is unusable: ``timeout``, ``error`` (transport),
    ``bad_status``, ``invalid`` (not the JSON object expected)."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


class OutboundRefused(OutboundError):
    """The request was refused by the guard before or while it was made: ``refused_url`` (scheme,
    host allow-list, a host that is an address or a local name), ``refused_address`` (a resolved
    address that is not public), ``rate_limited``, ``redirect``, ``too_large``."""
