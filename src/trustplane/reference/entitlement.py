"""Event-time entitlement: is the mandate behind a trade still usable at the instant a service acts
on it? Asked of the authorization server's RFC 7662 introspection endpoint, which answers
``active: false`` for a token whose mandate is revoked, suspended, expired or superseded (see
``trustplane.oauth.introspection``): never cached, since the point is the status *now*.

A trade whose envelope names a mandate needs the acting token to rest on the same mandate; a trade
and token with no mandate at all have nothing to re-check. A token derived at a partner from a
token resting on a mandate names that mandate in its provenance (``prv.mandate``, not one of the
partner's own mandates: docs/token_exchange.md), not in ``mandate``; that reference counts as the
token's mandate, and the partner's introspection still decides liveness (a partner revokes the
tokens it derived from a revoked mandate, by SSF: docs/ssf.md). An issuer that cannot be asked fails
closed (503) and raises no exception: the status is unknown, not lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from trustplane.outbound import OutboundError, OutboundFetcher
from trustplane.pep.client_auth import ClientAuth
from trustplane.pep.keys import check_url

log = structlog.get_logger("trustplane.reference")


class EntitlementUnavailable(Exception):
    """The issuer could not say whether the mandate is usable (network, status, body)."""


@dataclass(frozen=True, slots=True)
class MandateStatus:
    """``reason``: ``active``, ``no_mandate``, ``mandate_not_usable``, ``mandate_mismatch`` or
    ``mandate_unverifiable``."""

    usable: bool
    reason: str
    detail: str
    mandate: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "usable": self.usable,
            "reason": self.reason,
            "detail": self.detail,
            "mandate": dict(self.mandate) if self.mandate is not None else None,
        }


class MandateCheck(Protocol):
    async def check(
        self, token: str | None, claims: Mapping[str, Any], trade_envelope: Mapping[str, Any]
    ) -> MandateStatus: ...


def provenance_mandate(claims: Mapping[str, Any], depth: int = 4) -> dict[str, Any] | None:
    """The first mandate reference down the ``prv`` chain (at most ``depth`` levels)."""
    node = claims.get("prv")
    for _ in range(depth):
        if not isinstance(node, dict):
            return None
        if isinstance(node.get("mandate"), dict):
            return dict(node["mandate"])
        node = node.get("prv")
    return None


def held_mandate(claims: Mapping[str, Any]) -> Any:
    """The mandate the acting token rests on: its own ``mandate``, else its provenance's."""
    own = claims.get("mandate")
    return own if isinstance(own, dict) else provenance_mandate(claims)


def _same_mandate(
    claims: Mapping[str, Any], trade_envelope: Mapping[str, Any]
) -> MandateStatus | None:
    """The answer that needs no introspection, or None."""
    traded, held = trade_envelope.get("mandate"), held_mandate(claims)
    if traded is None and held is None:
        return MandateStatus(True, "no_mandate", "the trade rests on no mandate")
    if not isinstance(traded, dict) or not isinstance(held, dict):
        return MandateStatus(
            False, "mandate_mismatch", "the acting token does not carry the trade's mandate", traded
        )
    if traded.get("id") != held.get("id"):
        return MandateStatus(
            False, "mandate_mismatch", "the acting token rests on another mandate", traded
        )
    return None


class IntrospectionMandateCheck:
    """Asks ``endpoint`` (the issuer's introspection) about the acting token, authenticated as
    ``auth``'s client, through the guarded ``fetcher``."""

    def __init__(self, endpoint: str, auth: ClientAuth, fetcher: OutboundFetcher) -> None:
        self.endpoint = check_url(endpoint, "introspection endpoint", fetcher)
        self._auth, self._fetcher = auth, fetcher

    async def check(
        self, token: str | None, claims: Mapping[str, Any], trade_envelope: Mapping[str, Any]
    ) -> MandateStatus:
        early = _same_mandate(claims, trade_envelope)
        if early is not None:
            return early
        mandate = trade_envelope["mandate"]
        if token is None:
            return MandateStatus(False, "mandate_unverifiable", "no token to introspect", mandate)
        form = {"token": token, "token_type_hint": "access_token"}
        headers = {"Accept": "application/json"}
        self._auth.apply(form, headers)
        try:
            response = await self._fetcher.request(
                "POST", self.endpoint, purpose="reference_entitlement", data=form, headers=headers
            )
            body = response.json() if response.status == 200 else None
        except OutboundError as exc:
            raise EntitlementUnavailable(f"{exc.outcome}: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
            raise EntitlementUnavailable(f"status {response.status}")
        if body["active"]:
            return MandateStatus(True, "active", "the issuer reports the mandate usable", mandate)
        return MandateStatus(
            False,
            "mandate_not_usable",
            "the issuer reports the token inactive: its mandate is revoked, suspended, expired "
            "or superseded (or the token itself was revoked)",
            mandate,
        )
