"""RFC 9162 §2.1: the reference vectors (fixtures), and properties over random sizes and indices: every
proof the tree produces verifies, every altered proof fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustplane.audit import merkle

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "rfc9162_merkle.json").read_text()
)
LEAVES = [merkle.leaf_hash(bytes.fromhex(x)) for x in VECTORS["leaves"]]
TREE = merkle.MemoryTree(LEAVES)


def _hex(hashes: list[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


@pytest.mark.parametrize(("size", "root"), VECTORS["roots"].items())
def test_reference_roots(size: str, root: str) -> None:
    n = int(size)
    assert TREE.root(n).hex() == root
    assert merkle.root_of(LEAVES[:n]) == (n, bytes.fromhex(root))


def test_empty_tree_root_is_the_hash_of_nothing() -> None:
    assert merkle.root_of([]) == (0, bytes.fromhex(VECTORS["empty_root"]))


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: f"{c['index']}@{c['size']}")
def test_reference_inclusion_proofs(case: dict[str, Any]) -> None:
    index, size = case["index"], case["size"]
    proof = TREE.inclusion(index, size)
    assert _hex(proof) == case["proof"]
    root = bytes.fromhex(VECTORS["roots"][str(size)])
    assert merkle.verify_inclusion(index, size, LEAVES[index], proof, root)


@pytest.mark.parametrize(
    "case", VECTORS["consistency"], ids=lambda c: f"{c['first']}-{c['second']}"
)
def test_reference_consistency_proofs(case: dict[str, Any]) -> None:
    first, second = case["first"], case["second"]
    proof = TREE.consistency(first, second)
    assert _hex(proof) == case["proof"]
    roots = VECTORS["roots"]
    assert merkle.verify_consistency(
        first, second, bytes.fromhex(roots[str(first)]), bytes.fromhex(roots[str(second)]), proof
    )


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH, literally (the reference the stored-subtree algorithm is checked against)."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


BIG = merkle.MemoryTree(_leaves(301))


@given(st.integers(1, 300))
def test_stored_subtrees_give_the_rfc_root(size: int) -> None:
    assert BIG.root(size) == _mth(_leaves(size))


@given(st.data())
@settings(max_examples=300)
def test_every_inclusion_proof_verifies_and_every_alteration_fails(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 300))
    index = data.draw(st.integers(0, size - 1))
    root, leaf = BIG.root(size), BIG.nodes[index]
    proof = BIG.inclusion(index, size)
    assert merkle.verify_inclusion(index, size, leaf, proof, root)
    for altered in _alterations(proof, data):
        assert not merkle.verify_inclusion(index, size, leaf, altered, root)
    assert not merkle.verify_inclusion(index, size, merkle.leaf_hash(b"other"), proof, root)
    if size > 1:
        other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index))
        assert not merkle.verify_inclusion(other, size, leaf, proof, root)
    assert not merkle.verify_inclusion(index, size + 1, leaf, proof, BIG.root(size + 1))
    assert not merkle.verify_inclusion(size, size, leaf, proof, root)


@given(st.data())
@settings(max_examples=300)
def test_every_consistency_proof_verifies_and_every_alteration_fails(data: st.DataObject) -> None:
    second = data.draw(st.integers(1, 300))
    first = data.draw(st.integers(1, second))
    r1, r2 = BIG.root(first), BIG.root(second)
    proof = BIG.consistency(first, second)
    assert merkle.verify_consistency(first, second, r1, r2, proof)
    for altered in _alterations(proof, data):
        assert not merkle.verify_consistency(first, second, r1, r2, altered)
    if first < second:
        assert not merkle.verify_consistency(first, second, merkle.leaf_hash(b"x"), r2, proof)
        assert not merkle.verify_consistency(first, second, r1, merkle.leaf_hash(b"x"), proof)
    assert not merkle.verify_consistency(second, first, r2, r1, proof) or first == second


def _alterations(proof: list[bytes], data: st.DataObject) -> list[list[bytes]]:
    out = [[*proof, merkle.leaf_hash(b"extra")]]
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        flipped = bytearray(proof[i])
        flipped[bit // 8] ^= 1 << (bit % 8)
        out += [[*proof[:i], bytes(flipped), *proof[i + 1 :]], proof[:-1], proof[1:]]
        if len(proof) > 1 and proof[0] != proof[1]:
            out.append([proof[1], proof[0], *proof[2:]])
    return out


@given(st.lists(st.integers(1, 40), min_size=1, max_size=12))
def test_integrating_in_batches_builds_the_same_tree(batches: list[int]) -> None:
    """The sequencer's incremental build (frontier only) equals the whole-tree build."""
    total = sum(batches)
    nodes: dict[int, bytes] = {}
    size = 0
    for batch in batches:
        builder = merkle.TreeBuilder(size, {i: nodes[i] for i in merkle.frontier_ids(size)})
        for leaf in _leaves(total)[size : size + batch]:
            nodes.update(builder.append(leaf))
        size = builder.size
        assert builder.root() == _mth(_leaves(size))
    assert nodes == merkle.MemoryTree(_leaves(total)).nodes


@given(st.integers(0, 300), st.lists(st.integers(1, 70), min_size=1, max_size=6))
def test_a_batch_built_at_once_gives_its_nodes_per_level_and_the_next_frontier(
    size: int, batches: list[int]
) -> None:
    """The sequencer's batch path (``extend`` over a slice, the per-level runs the proof cache
    takes, the frontier the next batch starts from) gives the nodes of the whole-tree build."""
    total = size + sum(batches)
    whole = merkle.MemoryTree(_leaves(total))
    frontier = {i: whole.nodes[i] for i in merkle.frontier_ids(size)}
    for batch in batches:
        builder = merkle.TreeBuilder(size, frontier, runs=True)
        made = builder.extend(_leaves(size + batch)[size:])
        assert dict(made) == {i: h for i, h in whole.nodes.items() if i in dict(made)}
        before, after = (merkle.MemoryTree(_leaves(n)).nodes for n in (size, size + batch))
        assert set(dict(made)) == set(after) - set(before)
        for level, first, blob in builder.runs():
            ids = [merkle.node_id(level, first + k) for k in range(len(blob) // 32)]
            assert blob == b"".join(whole.nodes[i] for i in ids)
            assert set(ids) == {i for i in dict(made) if i >> merkle.LEVEL_SHIFT == level}
        assert builder.root() == whole.root(size + batch)
        size, frontier = builder.size, builder.frontier()
        assert frontier == {i: whole.nodes[i] for i in merkle.frontier_ids(size)}


def test_leaf_hashes_are_the_leaf_hash_of_each_entry_utf8() -> None:
    entries = ['{"a":"b"}', '{"subject":"ünïcode \u0000"}', ""]
    assert merkle.leaf_hashes(entries) == [merkle.leaf_hash(e.encode()) for e in entries]


def test_proof_arguments_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="not in a tree"):
        merkle.inclusion_ranges(5, 5)
    with pytest.raises(ValueError, match="no consistency proof"):
        merkle.consistency_ranges(0, 5)
    with pytest.raises(ValueError, match="no consistency proof"):
        merkle.consistency_ranges(6, 5)


def test_a_proof_needs_logarithmically_many_stored_nodes() -> None:
    size = 1_000_003
    for index in (0, 1, size // 2, size - 1):
        assert len(merkle.needed_nodes(merkle.inclusion_ranges(index, size))) <= 2 * 21
    assert len(merkle.needed_nodes(merkle.consistency_ranges(999_999, size))) <= 2 * 21
