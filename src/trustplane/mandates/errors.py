"""Mandate errors. Not wire errors themselves: the caller maps them (a grant to ``invalid_grant``,
the management API to 404/409/422)."""

from __future__ import annotations

from trustplane.errors import InvalidGrantError


class MandateError(Exception):
    """Base class; ``str(self)`` is safe to show to the caller."""


class MandateNotFoundError(MandateError):
    """No mandate (or no such version of it)."""


class MandateInvalidError(MandateError):
    """The requested terms are invalid (unknown client, bad dates, scopes outside the client's)."""


class MandateStateError(MandateError):
    """The transition is not allowed from the mandate's current status (e.g. amend a revoked one)."""


class MandateConflictError(MandateError):
    """Optimistic concurrency: the mandate moved on (``expected_version`` is stale)."""


class MandateUnusableError(MandateError):
    """The mandate version cannot back a token now. ``reason`` is one of ``not_found``, ``proposed``,
    ``suspended``, ``revoked``, ``expired``, ``superseded``, ``not_yet_effective``."""

    def __init__(self, mandate_id: str, version: int, reason: str) -> None:
        super().__init__(f"mandate {mandate_id} v{version} is {reason.replace('_', ' ')}")
        self.mandate_id, self.version, self.reason = mandate_id, version, reason

    def to_oauth(self) -> InvalidGrantError:
        """RFC 6749 §5.2: the grant rests on an authorization that is no longer valid."""
        return InvalidGrantError(
            "the mandate behind this grant is no longer usable", debug=str(self)
        )
