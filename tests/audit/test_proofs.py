"""Proofs served from the database (and from the nodes kept in memory) against an independent
recomputation: RFC 9162 §2.1.3.1 PATH and §2.1.4.1 PROOF written as the RFC states them, recursively
over the leaf hashes, at every index and every size the log passes through while it grows."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from tests.audit.ledger_helpers import append, event, export
from trustplane.app import Services
from trustplane.audit import proof_nodes
from trustplane.audit.ledger import Ledger


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH over leaf hashes."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << (len(leaves) - 1).bit_length() - 1
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n])."""
    if len(leaves) == 1:
        return []
    k = 1 << (len(leaves) - 1).bit_length() - 1
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """RFC 9162 §2.1.4.1 SUBPROOF(m, D[n], b)."""
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = 1 << (n - 1).bit_length() - 1
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


@pytest.mark.parametrize("cached_from_level", [0, proof_nodes.MIN_LEVEL])
async def test_proofs_equal_the_rfc_recomputation_while_the_log_grows(
    services: Services, monkeypatch: pytest.MonkeyPatch, cached_from_level: int
) -> None:
    """Level 0: every node read is kept, so each size after the first is proved partly from nodes
    read at smaller sizes (a stale node would show here)."""
    monkeypatch.setattr(proof_nodes, "MIN_LEVEL", cached_from_level)
    ledger = Ledger(services.settings, services.db, services.ledger._kek)
    await services.ledger.integrate_all()
    sizes: list[int] = []
    for n, batch in enumerate([1, 1, 2, 3, 9, 16, 33]):
        await append(services.db, [event(n * 100 + i) for i in range(batch)])
        await services.ledger.integrate_all()
        records, _ = await export(ledger)
        leaves = [
            hashlib.sha256(b"\x00" + orjson.dumps(r["entry"], option=orjson.OPT_SORT_KEYS)).digest()
            for r in records
        ]
        size = len(leaves)
        sizes.append(size)
        for index in range(size):
            assert await ledger.inclusion(index, size) == path(index, leaves), (index, size)
        for old in sizes:
            for index in range(0, old, 3):
                assert await ledger.inclusion(index, old) == path(index, leaves[:old])
            assert await ledger.consistency(old, size) == subproof(old, leaves, True), (old, size)
