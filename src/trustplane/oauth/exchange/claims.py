"""The claims of a token issued by exchange: ``act`` (RFC 8693 §4.1), ``prv`` (the provenance chain),
and what the subject token's origin, partner and mandate keep.

``act`` = the current actor with the subject token's ``act`` nested inside it; ``prv`` = ``{iss, jti}``
of the subject token with the subject token's own ``prv`` nested. Both are copied at most
:data:`MAX_NESTING` levels deep: the PDP decides the allowed depth, this only bounds the size of what
we copy.
"""

from __future__ import annotations

from typing import Any

from trustplane.oauth.exchange.actor import Actor
from trustplane.oauth.exchange.subject import Subject

MAX_NESTING = 8


def act_claim(actor: Actor, subject: Subject) -> dict[str, Any]:
    act = actor.claim()
    previous = subject.claims.get("act")
    if isinstance(previous, dict):
        act["act"] = bounded(previous)
    return act


def token_claims(
    subject: Subject,
    act: dict[str, Any] | None,
    txn: str,
    details: tuple[dict[str, Any], ...],
) -> dict[str, Any]:
    """Everything the issued token carries besides the standard claims. A partner's mandate
    reference travels in ``prv`` (it is not one of ours to re-check); ours is kept and re-checked."""
    claims = subject.claims
    provenance: dict[str, Any] = {"iss": subject.issuer, "jti": subject.jti}
    previous = claims.get("prv")
    if isinstance(previous, dict):
        provenance["prv"] = bounded(previous)
    extra: dict[str, Any] = {"prv": provenance}
    if act is not None:
        extra["act"] = act
    if subject.partner is not None:
        extra.update(subject.partner.issued_claims())
        if isinstance(claims.get("origin"), dict):  # a partner token that kept its own origin
            extra["origin"] = bounded(claims["origin"])
        if isinstance(claims.get("mandate"), dict):
            provenance["mandate"] = bounded(claims["mandate"])
    else:
        for name in ("lei", "origin", "partner", "tctx"):
            if name in claims:
                extra[name] = claims[name]
        if subject.mandate is not None:
            extra["mandate"] = {"id": subject.mandate[0], "version": subject.mandate[1]}
    extra["txn"] = txn
    if details:
        extra["authorization_details"] = list(details)
    return extra


def chain(act: dict[str, Any]) -> tuple[str, ...]:
    """``act`` as a list of actor subjects, current actor first."""
    out: list[str] = []
    node: Any = act
    while isinstance(node, dict) and len(out) < MAX_NESTING + 1:
        out.append(str(node.get("sub"))[:256])
        node = node.get("act")
    return tuple(out)


def bounded(value: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """A nested ``act``/``prv`` copied with at most :data:`MAX_NESTING` levels."""
    out = {k: v for k, v in value.items() if k not in ("act", "prv")}
    for key in ("act", "prv"):
        inner = value.get(key)
        if isinstance(inner, dict) and depth < MAX_NESTING:
            out[key] = bounded(inner, depth + 1)
    return out
