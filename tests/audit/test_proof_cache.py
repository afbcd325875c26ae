"""The lower tree levels kept in memory for proofs (``proof_nodes.LowerLevels``): dense prefixes
of committed nodes, bounded by ``audit_proof_cache_mb``; every proof served from them equals the
RFC's and verifies against the signed checkpoint it names, while the tree grows too."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tests.audit.ledger_helpers import append, event
from tests.audit.test_proofs import leaf_hashes, path, signed_root, subproof
from trustplane.app import Services
from trustplane.audit import merkle, proof_nodes
from trustplane.audit.ledger import Ledger
from trustplane.audit.note import Verifier, open_checkpoint
from trustplane.audit.proof_nodes import LowerLevels


def node(level: int, index: int) -> int:
    return merkle.node_id(level, index)


def h(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_the_levels_kept_are_the_highest_that_fit_the_budget_and_the_floor_only_rises() -> None:
    sizes = [1000 >> level for level in range(proof_nodes.MIN_LEVEL)]
    lower = LowerLevels(32 * sum(sizes))  # every lower node of a tree of 1,000 entries
    lower.grown(1000)
    assert lower.floor == 0
    for level, count in enumerate(sizes):
        assert lower.extend(level, 0, b"".join(h(i) for i in range(count)))
    assert lower.get(node(0, 999)) == h(999)
    assert lower.get(node(0, 1000)) is None  # past the prefix
    assert lower.bytes_kept == 32 * sum(sizes)
    lower.grown(1100)  # level 0 no longer fits with the others: let go
    assert lower.floor == 1
    assert lower.count(0) == 0
    assert lower.get(node(0, 5)) is None
    lower.extend_one(node(0, 0), h(0))
    assert not lower.extend(0, 0, h(0))
    assert lower.count(0) == 0  # a level below the floor does not start again
    assert lower.get(node(1, 499)) == h(499)
    lower.grown(10)  # a smaller size (an older proof's): nothing changes
    assert lower.floor == 1


def test_a_prefix_grows_only_by_the_node_that_follows_it() -> None:
    lower = LowerLevels(1 << 20)
    lower.grown(64)
    lower.extend_one(node(2, 1), h(1))  # a gap: refused
    assert lower.count(2) == 0
    lower.extend_one(node(2, 0), h(0))
    lower.extend_one(node(2, 1), h(1))
    lower.extend_one(node(2, 1), h(99))  # already there: unchanged
    assert [lower.get(node(2, i)) for i in range(3)] == [h(0), h(1), None]
    assert not lower.extend(2, 3, h(3))  # would leave a gap at index 2
    assert lower.extend(2, 1, h(1) + h(2) + h(3))  # overlapping: the tail only
    assert [lower.get(node(2, i)) for i in range(4)] == [h(0), h(1), h(2), h(3)]
    assert not lower.extend(2, 4, b"short")


def test_no_budget_keeps_no_lower_level() -> None:
    lower = LowerLevels(0)
    lower.grown(1 << 20)
    assert lower.floor == proof_nodes.MIN_LEVEL
    lower.extend_one(node(0, 0), h(0))
    assert lower.get(node(0, 0)) is None
    assert not lower.behind([node(0, 0), node(7, 0)])


def no_reads(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on any statement of the ledger's proof reader fails the test."""

    async def refused(*args: Any) -> Any:
        raise AssertionError(f"a proof read the database: {args[:1]}")

    for name in ("_driver_rows", "_engine_rows", "_rows"):
        monkeypatch.setattr(ledger._nodes, name, refused)


async def test_once_warm_every_proof_is_served_from_memory(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: the nodes below level 8 were read from the database for every proof. (Runs of
    8 nodes per statement, 2 on SQLite: each level's prefix read in several.)"""
    monkeypatch.setattr(proof_nodes, "FILL_CHUNK", 8)
    await append(services.db, [event(i) for i in range(70)])
    await services.ledger.integrate_all()
    leaves = await leaf_hashes(services.ledger)
    size = len(leaves)
    root = await signed_root(services, size)
    ledger = Ledger(services.settings, services.db, services.ledger._kek)
    await ledger.warm()
    no_reads(ledger, monkeypatch)
    for index in range(size):
        proof = await ledger.inclusion(index, size)
        assert proof == path(index, leaves), index
        assert merkle.verify_inclusion(index, size, leaves[index], proof, root), index
    for old in range(1, size, 7):
        assert await ledger.consistency(old, size) == subproof(old, leaves, True), old


async def test_a_starting_server_reads_the_lower_levels_in_the_background(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    await append(services.db, [event(i) for i in range(40)])
    await services.ledger.integrate_all()
    leaves = await leaf_hashes(services.ledger)
    size = len(leaves)
    ledger = Ledger(services.settings, services.db, services.ledger._kek)
    await ledger.start()
    filling = ledger._nodes._filling
    assert filling is not None
    await ledger.warm()  # waits for it, then reads what is left (nothing)
    assert filling.done()
    no_reads(ledger, monkeypatch)
    for index in range(size):
        assert await ledger.inclusion(index, size) == path(index, leaves), index


async def test_the_sequencer_keeps_the_lower_nodes_it_commits(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = services.settings.model_copy(update={"audit_integrate_batch": 7})
    ledger = Ledger(settings, services.db, services.ledger._kek)
    await ledger.warm()  # as a server starts (the log key's entry is integrated)
    sizes = []
    for n in (1, 2, 5, 13, 30):
        await append(services.db, [event(100 * n + i) for i in range(n)])
        await ledger.integrate_all()
        sizes.append((await ledger.checkpoint()).size)  # type: ignore[union-attr]
    leaves = await leaf_hashes(ledger)
    with monkeypatch.context() as patch:
        no_reads(ledger, patch)
        for size in sizes:
            for index in range(size):
                assert await ledger.inclusion(index, size) == path(index, leaves[:size])


async def served_from_memory(
    ledger: Ledger,
    filling: asyncio.Task[None] | None,
    leaves: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fill that was started ends; then every proof at the size of ``leaves`` is folded from
    memory alone (no statement) and is right."""
    assert filling is not None
    await filling
    no_reads(ledger, monkeypatch)
    for index in range(len(leaves)):
        assert await ledger.inclusion(index, len(leaves)) == path(index, leaves), index


async def test_a_sequencer_behind_another_catches_up_after_its_batch(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its batch did not follow its prefixes (another process integrated before it) and proofs
    are being asked: it starts the fill up to its new size."""
    ledger = Ledger(services.settings, services.db, services.ledger._kek)
    await ledger.warm()
    await append(services.db, [event(i) for i in range(11)])
    await services.ledger.integrate_all()  # another sequencer
    await ledger.inclusion(0, 11)  # a proof, served meanwhile (it starts a fill of its own)
    first = ledger._nodes._filling
    if first is not None:
        await first
    await append(services.db, [event(100 + i) for i in range(6)])
    await services.ledger.integrate_all()  # the other sequencer again: this one lags
    await append(services.db, [event(200 + i) for i in range(5)])
    await ledger.integrate_all()
    filling = ledger._nodes._filling
    assert filling is not first
    await served_from_memory(ledger, filling, await leaf_hashes(ledger), monkeypatch)


async def test_a_sequencer_behind_another_fills_nothing_while_no_proof_is_asked(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No proof asked (a token workload): a batch that did not follow the prefixes starts no fill
    (it read the other process's nodes after nearly every batch before); the first proof then
    reads from the database, starts the fill, and is right."""
    ledger = Ledger(services.settings, services.db, services.ledger._kek)
    await ledger.warm()
    await append(services.db, [event(i) for i in range(11)])
    await services.ledger.integrate_all()  # another sequencer
    await append(services.db, [event(100 + i) for i in range(6)])
    await ledger.integrate_all()
    assert ledger._nodes._filling is None
    leaves = await leaf_hashes(ledger)
    assert await ledger.inclusion(2, len(leaves)) == path(2, leaves)
    await served_from_memory(ledger, ledger._nodes._filling, leaves, monkeypatch)


async def test_a_reader_catches_up_with_what_another_process_integrated(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first proof at the new size is read from the database and starts the fill; the
    proofs after it are served from memory."""
    await append(services.db, [event(i) for i in range(20)])
    await services.ledger.integrate_all()
    reader = Ledger(services.settings, services.db, services.ledger._kek)
    await reader.warm()
    await append(services.db, [event(100 + i) for i in range(45)])
    await services.ledger.integrate_all()  # another sequencer than the reader
    leaves = await leaf_hashes(services.ledger)
    size = len(leaves)
    assert await reader.inclusion(3, size) == path(3, leaves)
    await served_from_memory(reader, reader._nodes._filling, leaves, monkeypatch)


async def test_a_fill_never_keeps_a_node_the_tree_does_not_have(services: Services) -> None:
    """Asked for a larger tree than exists, the runs that come back short are not kept: what is
    kept at each level is only the nodes of complete subtrees of the tree that exists."""
    await append(services.db, [event(i) for i in range(20)])
    await services.ledger.integrate_all()
    leaves = await leaf_hashes(services.ledger)
    size = len(leaves)
    ledger = Ledger(services.settings, services.db, services.ledger._kek)
    await ledger.warm()
    nodes = ledger._nodes
    await nodes.fill(size + 64)
    tree = merkle.MemoryTree(leaves)
    for level in range(proof_nodes.MIN_LEVEL):
        kept = nodes._lower.count(level)
        assert kept << level <= size, level
        for index in range(kept):
            assert nodes._lower.get(node(level, index)) == tree.nodes[node(level, index)]


async def test_a_small_budget_keeps_the_upper_levels_and_reads_the_rest(
    services: Services,
) -> None:
    await append(services.db, [event(i) for i in range(70)])
    await services.ledger.integrate_all()
    leaves = await leaf_hashes(services.ledger)
    size = len(leaves)
    root = await signed_root(services, size)
    ledger = Ledger(services.settings, services.db, services.ledger._kek)
    ledger._nodes._lower.budget = 32 * sum(size >> level for level in range(3, 8))
    await ledger.warm()
    assert ledger._nodes._lower.floor == 3
    assert ledger._nodes._lower.count(2) == 0
    assert ledger._nodes._lower.count(3) == size >> 3
    for index in range(size):
        proof = await ledger.inclusion(index, size)
        assert merkle.verify_inclusion(index, size, leaves[index], proof, root), index


async def test_proofs_asked_while_the_tree_grows_verify_against_their_checkpoints(
    services: Services,
) -> None:
    """Provers ask proofs against the latest signed checkpoint while the sequencer of the same
    process integrates in small batches (its nodes entering memory as they commit); every
    proof verifies against the root of the note it names."""
    settings = services.settings.model_copy(update={"audit_integrate_batch": 9})
    ledger = Ledger(settings, services.db, services.ledger._kek)
    await ledger.integrate_all()
    await ledger.warm()
    await append(services.db, [event(i) for i in range(150)])
    verifier = Verifier.parse(await ledger.verifier_key())
    asked: list[tuple[int, int, list[bytes], bytes]] = []
    rng = random.Random(7)
    sequencer = asyncio.ensure_future(ledger.integrate_all())

    async def prover() -> None:
        while not sequencer.done():
            checkpoint = await ledger.checkpoint()
            assert checkpoint is not None
            opened = open_checkpoint(checkpoint.note, verifier, ledger.origin)
            index = rng.randrange(opened.size)
            asked.append(
                (index, opened.size, await ledger.inclusion(index, opened.size), opened.root)
            )

    await asyncio.gather(*(prover() for _ in range(4)))
    await sequencer
    leaves = await leaf_hashes(ledger)
    assert len({size for _, size, _, _ in asked}) > 3
    for index, size, proof, root in asked:
        assert merkle.verify_inclusion(index, size, leaves[index], proof, root), (index, size)
