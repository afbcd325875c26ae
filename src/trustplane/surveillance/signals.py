"""What the detector reads (:class:`Observed`, one ledger entry), what it raises (:class:`Alert`) and
the thresholds it compares with (:class:`Thresholds`, from the ``surveillance_*`` settings)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from trustplane.audit_events import AuditEventType
from trustplane.settings import Settings


class Signal(StrEnum):
    """The signals; the value is the ``signal`` label of ``trustplane_surveillance_alerts_total``
    and the ``reason`` of the alert's ledger entry."""

    NEW_ACTOR_PAIR = "unusual_delegation.new_actor_pair"
    DEEP_CHAIN = "unusual_delegation.deep_chain"
    CLAIM_FAILURES = "partner.claim_failures"
    ISSUANCE_SPIKE = "issuance.spike"


ISSUED = AuditEventType.TOKEN_ISSUED.value
REFUSED = AuditEventType.TOKEN_REFUSED.value
#: Leaves a round handles between two turns of the event loop (~1-2 ms; a round of thousands in
#: one go would hold up every request of its process for tens of milliseconds).
SLICE = 256
#: The ledger entry types the detector looks at; every other entry only moves the cursor.
WATCHED = frozenset({ISSUED, REFUSED})


@dataclass(frozen=True, slots=True)
class Thresholds:
    """``learning``: exchanges of a client before a new actor pair or a chain deeper than its
    maximum so far raises anything (until then they are learned); ``max_chain_depth``: an absolute
    depth above which every exchange alerts (0: none). Windows are fixed, aligned on multiples of
    their length in ledger time (the entry's ``time``)."""

    learning: int = 10
    max_chain_depth: int = 3
    claim_failures: int = 5
    claim_window_s: int = 600
    claim_reasons: frozenset[str] = frozenset(
        {"missing_claim", "claim_value", "product_not_allowed", "region_not_allowed", "transaction"}
    )
    issuance_window_s: int = 300
    issuance_floor: int = 100
    issuance_factor: float = 5.0
    issuance_baseline_windows: int = 12

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            learning=settings.surveillance_delegation_learning,
            max_chain_depth=settings.surveillance_max_chain_depth,
            claim_failures=settings.surveillance_claim_failures,
            claim_window_s=settings.surveillance_claim_failure_window,
            claim_reasons=frozenset(settings.surveillance_claim_failure_reasons),
            issuance_window_s=settings.surveillance_issuance_window,
            issuance_floor=settings.surveillance_issuance_floor,
            issuance_factor=settings.surveillance_issuance_factor,
            issuance_baseline_windows=settings.surveillance_issuance_baseline_windows,
        )


@dataclass(frozen=True, slots=True)
class Observed:
    """The envelope fields of one ledger entry that the signals use, with its leaf index."""

    index: int
    type: str
    time_ms: int
    client_id: str | None = None
    subject: str | None = None
    partner: str | None = None
    actor_chain: tuple[str, ...] = ()
    reason_ids: tuple[str, ...] = ()
    transaction_id: str | None = None

    @classmethod
    def from_leaf(cls, leaf: Sequence[Any]) -> Observed:
        """From a row of :func:`trustplane.surveillance.store.read_leaves`: the leaf's columns, and
        the entry text only where a list it holds matters (else None: nothing is parsed)."""
        index, type_, time_ms, client_id, subject, partner, transaction_id, entry = leaf
        chain: tuple[str, ...] = ()
        reasons: tuple[str, ...] = ()
        if entry is not None:
            parsed = orjson.loads(entry)
            chain = tuple(str(a) for a in parsed.get("actor_chain") or ())
            reasons = tuple(str(r) for r in parsed.get("reason_ids") or ())
        return cls(
            int(index),
            str(type_),
            int(time_ms),
            client_id,
            subject,
            partner,
            chain,
            reasons,
            transaction_id,
        )


@dataclass(frozen=True, slots=True)
class Alert:
    """One raised signal. ``evidence``: the ledger indices it rests on (for a window, the first
    entry counted and the one that crossed the threshold); ``observed`` crossed ``threshold``
    (a count over a window of ``window_s`` seconds starting at ``window_start_ms``, or a depth)."""

    signal: Signal
    observed: float
    threshold: float
    evidence: tuple[int, ...]
    client_id: str | None = None
    partner: str | None = None
    subject: str | None = None
    actor_chain: tuple[str, ...] = ()
    transaction_id: str | None = None
    window_s: int | None = None
    window_start_ms: int | None = None

    def reason_ids(self) -> tuple[str, ...]:
        """Identifiers for the ledger envelope (kept when the payload is purged)."""
        out = [f"observed={_num(self.observed)}", f"threshold={_num(self.threshold)}"]
        if self.window_s is not None:
            out.append(f"window={self.window_s}s")
        out.append("sequence=" + ",".join(str(i) for i in self.evidence))
        return tuple(out)

    def payload(self) -> dict[str, Any]:
        return {
            "signal": self.signal.value,
            "observed": self.observed,
            "threshold": self.threshold,
            "window_seconds": self.window_s,
            "window_start_ms": self.window_start_ms,
            "evidence": {"sequence": list(self.evidence), "transaction_id": self.transaction_id},
        }


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"
