"""The chain of authority a resource server requires of a delegated token, beyond its signature.

A token exchanged across deployments (RFC 8693) says who acts (``act``, the current actor outermost,
inner members are history, §4.1), which tokens it derives from (trustplane's ``prv``: the subject
token's ``{iss, jti}``, nested for each earlier hop), who originated the request (``origin``, kept
by the federation gateway, never flattened), under which mandate (``mandate``, or ``prv.mandate``
for a partner's), and in which business transaction (``txn``). The signature proves only that the
last issuer wrote all of this; a :class:`ChainRequirement` states what THIS resource server accepts:
for example the clearing broker accepts settlement tokens only where its member (the broker) acts
for an arranger it knows, and the token derives from that arranger's tokens under a mandate.

Every comparison is exact (issuer strings as they appear in the claims; no prefix or case folding),
and a chain longer than required is refused like a shorter one: a hop nobody expected is a finding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Nesting read at most (trustplane issues at most 8 levels of ``act`` and ``prv``).
MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class ChainRequirement:
    """What a token's chain of authority must be. Empty fields require nothing.

    ``actors``: the issuers of the ``act`` chain, current actor first, exactly;
    ``provenance``: the issuers of the ``prv`` chain, outermost (the subject token) first, exactly;
    ``origin``: the issuer in ``origin``; ``mandate``: a mandate reference (``mandate`` or
    ``prv.mandate``) must be present; ``transaction``: a ``txn`` must be present.
    """

    actors: tuple[str, ...] = ()
    provenance: tuple[str, ...] = ()
    origin: str | None = None
    mandate: bool = False
    transaction: bool = False

    def problem(self, claims: Mapping[str, Any]) -> str | None:
        """The first way ``claims`` fall short, as a sentence for the error description; None if
        the chain is acceptable."""
        if self.actors and issuers(claims, "act") != list(self.actors):
            return f"the act chain is not {' -> '.join(self.actors)}"
        if self.provenance and issuers(claims, "prv") != list(self.provenance):
            return f"the token does not derive from {' <- '.join(self.provenance)}"
        origin = claims.get("origin")
        if self.origin is not None and (
            not isinstance(origin, dict) or origin.get("iss") != self.origin
        ):
            return f"the origin is not {self.origin}"
        if self.mandate and not _has_mandate(claims):
            return "no mandate reference"
        txn = claims.get("txn")
        if self.transaction and not (isinstance(txn, str) and txn):
            return "no transaction id"
        return None


def issuers(claims: Mapping[str, Any], member: str) -> list[str]:
    """The ``iss`` of each level of a nested ``act`` or ``prv`` claim, outermost first; a level
    without a string ``iss`` ends the list with an empty string (it can never match)."""
    out: list[str] = []
    node = claims.get(member)
    while isinstance(node, dict) and len(out) < MAX_DEPTH:
        iss = node.get("iss")
        out.append(iss if isinstance(iss, str) else "")
        node = node.get(member)
    return out


def _has_mandate(claims: Mapping[str, Any]) -> bool:
    prv = claims.get("prv")
    found = claims.get("mandate") or (prv.get("mandate") if isinstance(prv, dict) else None)
    return isinstance(found, dict) and isinstance(found.get("id"), str)
