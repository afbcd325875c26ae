"""Partner-signed JWTs presented at the token endpoint: verified once, their ``jti`` used once.

Two grants accept them: the JWT-bearer grant (RFC 7523 §2.1, the ``assertion``) and token exchange
(RFC 8693 §2.1, a partner's ``subject_token``). Both verify with
:meth:`PartnerRegistry.verify_partner_jwt` (that partner's keys only, its algorithms, lifetimes and
required claims), count the outcome in ``trustplane_partner_assertions_total``, keep the audience and
scopes within the partner's profile, and treat an assertion's ``jti`` as single-use: a
:class:`~trustplane.grant.outcomes.ConsumeJti` condition committed with the token outcome, or (Redis)
consumed at once. What differs is the wire error: RFC 7523 §3.1 says ``invalid_grant``, RFC 8693
§2.2.2 ``invalid_request``; each grant passes its own error class.
"""

from __future__ import annotations

from collections.abc import Callable

from trustplane import metrics
from trustplane.errors import InvalidScopeError, InvalidTargetError, OAuth2Error
from trustplane.federation.registry import PartnerRegistry, PartnerTokenError, VerifiedPartnerToken
from trustplane.grant.outcomes import Condition, ConsumeJti
from trustplane.protocol.replay import ReplayCache

#: The grant's error class: ``(description, *, debug, reason_id, partner)`` (``trustplane.errors``).
Refusal = Callable[..., OAuth2Error]


class PartnerAssertions:
    def __init__(self, *, registry: PartnerRegistry, replay: ReplayCache, clock_skew: int) -> None:
        self._registry, self._replay, self._skew = registry, replay, clock_skew

    async def verify(
        self,
        token: str,
        *,
        audience: str,
        accepted_types: frozenset[str],
        refusal: Refusal,
        now: int | None = None,
    ) -> VerifiedPartnerToken:
        """The verified token, or ``refusal`` with the registry's reason (counted per partner)."""
        try:
            return await self._registry.verify_partner_jwt(
                token, expected_audience=audience, accepted_types=accepted_types, now=now
            )
        except PartnerTokenError as exc:
            metrics.PARTNER_ASSERTIONS.labels(
                partner=exc.partner or "unknown", outcome=exc.reason_id
            ).inc()
            raise refusal(
                exc.description, debug=exc.debug, reason_id=exc.reason_id, partner=exc.partner
            ) from None

    async def single_use(
        self, verified: VerifiedPartnerToken, replayed: OAuth2Error
    ) -> tuple[Condition, ...]:
        """The assertion's ``jti`` to consume with the outcome (``replayed`` if it was used
        before); a replay cache that cannot defer (Redis) consumes it now and raises ``replayed``."""
        use = verified.replay_use(self._skew)
        if self._replay.deferrable:
            return (ConsumeJti(use, replayed),)
        if not await self._replay.consume(use.issuer, use.jti, use.expires_at):
            raise replayed
        return ()


def replayed(verified: VerifiedPartnerToken, refusal: Refusal, description: str) -> OAuth2Error:
    """RFC 7523 §3 item 7: the partner assertion's jti was used before."""
    return refusal(
        description,
        debug=f"partner assertion jti replay: {verified.jti[:64]}",
        reason_id="replay",
        partner=verified.partner.partner_id,
    )


def check_audience(verified: VerifiedPartnerToken, resource: str) -> None:
    """The audience must be one the partner's profile allows, besides the client's."""
    if resource not in verified.partner.allowed_audiences:
        raise InvalidTargetError("resource is not allowed for this partner", debug=resource)


def check_scopes(verified: VerifiedPartnerToken, scopes: tuple[str, ...]) -> None:
    """The scopes must be ones the partner's profile allows, besides the client's."""
    outside = [s for s in scopes if s not in verified.partner.allowed_scopes]
    if outside:
        raise InvalidScopeError(f"scope {outside[0]!r} is not allowed for this partner"[:200])
