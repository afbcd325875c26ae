"""RFC 9162 §2.1 Merkle tree hashing, proofs and their verification, independent of storage.

Storage keeps the hash of every *perfect* subtree (``2**level`` leaves starting at a multiple of
``2**level``) under one integer id (:func:`node_id`). Every range that an RFC 9162 proof needs is either
such a subtree or the right edge of a tree, which is the right fold of at most ``log2 n`` perfect
subtrees (:func:`perfect_nodes`). So a proof is: compute the ranges (:func:`inclusion_ranges`,
:func:`consistency_ranges`), read the O(log n) node ids they decompose into in one query, fold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

HASH_SIZE = 32
LEVEL_SHIFT = 48  # node id = level << 48 | index: 2**48 leaves, 64-bit signed ids

Range = tuple[int, int]


def leaf_hash(entry: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x00 || entry)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


def node_id(level: int, index: int) -> int:
    return (level << LEVEL_SHIFT) | index


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def perfect_nodes(start: int, end: int) -> list[tuple[int, int]]:
    """(level, index) of the aligned perfect subtrees covering ``[start, end)``, left to right.

    Valid for the ranges RFC 9162 proofs use: ``start`` is a multiple of a power of two >= end - start.
    """
    out = []
    while start < end:
        level = (end - start).bit_length() - 1
        while start & ((1 << level) - 1):
            level -= 1
        out.append((level, start >> level))
        start += 1 << level
    return out


def fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from its perfect subtrees (left to right): H(p1, H(p2, ... pk))."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n]): the ranges whose hashes form the proof, bottom-up."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} is not in a tree of size {size}")
    out: list[Range] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index - start < k:
            out.append((start + k, end))
            end = start + k
        else:
            out.append((start, start + k))
            start += k
    out.reverse()
    return out


def inclusion_nodes(index: int, size: int) -> list[list[int]]:
    """The proof of :func:`inclusion_ranges` as node ids, bottom-up: each range is one perfect
    subtree (one id), or the tree's right edge (its perfect subtrees, left to right, to
    :func:`fold`). Worked out level by level, without the ranges (a proof's CPU is mostly this).

    At level ``L`` the leaf's ancestor is ``index >> L``; its sibling covers leaves from
    ``s << L`` up to ``(s + 1) << L`` or the end of the tree, and is in the proof if it starts
    inside the tree (RFC 9162's left-balanced split puts every sibling at such a boundary)."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} is not in a tree of size {size}")
    out: list[list[int]] = []
    level = 0
    while (1 << level) < size:
        sibling = (index >> level) ^ 1
        start = sibling << level
        if start < size:
            if start + (1 << level) <= size:
                out.append([(level << LEVEL_SHIFT) | sibling])
            else:
                out.append(_edge_ids(start, size))
        level += 1
    return out


def _edge_ids(start: int, end: int) -> list[int]:
    """The perfect subtrees of ``[start, end)`` where ``start`` is aligned to a power of two at
    least ``end - start``: one per set bit of the length, the largest first."""
    ids = []
    rest = end - start
    while rest:
        level = rest.bit_length() - 1
        ids.append((level << LEVEL_SHIFT) | (start >> level))
        start += 1 << level
        rest -= 1 << level
    return ids


def consistency_ranges(first: int, second: int) -> list[Range]:
    """RFC 9162 §2.1.4.1 PROOF(m, D[n]) = SUBPROOF(m, D[n], true), as ranges."""
    if not 0 < first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    out: list[Range] = []
    start, end, m, whole = 0, second, first, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            out.append((start + k, end))
            end = start + k
        else:
            out.append((start, start + k))
            start, m, whole = start + k, m - k, False
    if not whole:
        out.append((start, end))
    out.reverse()
    return out


def needed_nodes(ranges: Iterable[Range]) -> set[int]:
    return {node_id(level, i) for a, b in ranges for level, i in perfect_nodes(a, b)}


def range_hashes(ranges: Sequence[Range], nodes: Mapping[int, bytes]) -> list[bytes]:
    """The hash of each range from the stored perfect-subtree hashes (KeyError if one is missing)."""
    return [fold([nodes[node_id(lv, i)] for lv, i in perfect_nodes(a, b)]) for a, b in ranges]


def root_from_frontier(frontier: Mapping[int, bytes], size: int) -> bytes:
    """The root of a tree of ``size`` from its right-edge perfect subtrees."""
    if size == 0:
        return EMPTY_ROOT
    return range_hashes([(0, size)], frontier)[0]


def frontier_ids(size: int) -> list[int]:
    """Node ids of the perfect subtrees that make up a tree of ``size`` (one per set bit)."""
    return [node_id(level, i) for level, i in perfect_nodes(0, size)] if size else []


class TreeBuilder:
    """Appends leaf hashes to a tree of ``size`` whose right edge (its perfect subtrees,
    :func:`frontier_ids`) is ``frontier``, and yields the perfect-subtree nodes that become complete.

    The edge is kept as a stack of hashes, largest subtree first: appending leaf ``i`` pops and
    hashes one node per trailing 1-bit of ``i`` (RFC 9162 §2.1.1's MTH, built bottom up). With
    ``runs`` it also keeps, per level, the hashes of the nodes it made since ``size``, in order
    (:meth:`runs`): what the proof cache takes from a committed batch in one step per level."""

    def __init__(self, size: int, frontier: Mapping[int, bytes], *, runs: bool = False) -> None:
        self.size = self._start = size
        self._stack = [frontier[i] for i in frontier_ids(size)]
        self._runs = [bytearray() for _ in range(LEVEL_SHIFT + 1)] if runs else None

    def append(self, leaf: bytes) -> list[tuple[int, bytes]]:
        return self.extend((leaf,))

    def extend(self, leaves: Iterable[bytes]) -> list[tuple[int, bytes]]:
        """Append ``leaves`` (leaf hashes) in order; the new nodes, each as ``(id, hash)``, in the
        order they completed (the sequencer's hot loop: about 1 us a leaf, no call per node)."""
        new: list[tuple[int, bytes]] = []
        add, stack, runs, sha256 = new.append, self._stack, self._runs, hashlib.sha256
        index = self.size
        for leaf in leaves:
            h, i, level = leaf, index, 0
            add((index, h))  # level 0: the id is the index
            if runs is not None:
                runs[0] += h
            while i & 1:
                h = sha256(b"\x01" + stack.pop() + h).digest()
                i >>= 1
                level += 1
                add(((level << LEVEL_SHIFT) | i, h))
                if runs is not None:
                    runs[level] += h
            stack.append(h)
            index += 1
        self.size = index
        return new

    def root(self) -> bytes:
        return fold(self._stack) if self._stack else EMPTY_ROOT

    def frontier(self) -> dict[int, bytes]:
        """The right edge of the tree as built so far: the frontier of a builder at this size."""
        return dict(zip(frontier_ids(self.size), self._stack, strict=True))

    def runs(self) -> list[tuple[int, int, bytes]]:
        """(level, index of its first node, the hashes of its nodes in order) for every level that
        got nodes since the builder started (only with ``runs=True``): the nodes of a level
        complete in index order, from ``start >> level`` on."""
        if self._runs is None:
            raise ValueError("this builder keeps no runs")
        start = self._start
        return [(lv, start >> lv, bytes(run)) for lv, run in enumerate(self._runs) if run]


def leaf_hashes(entries: Iterable[str]) -> list[bytes]:
    """:func:`leaf_hash` of each entry's UTF-8 (the sequencer's entries, as read from the store)."""
    sha256 = hashlib.sha256
    return [sha256(b"\x00" + entry.encode()).digest() for entry in entries]


def root_of(leaves: Iterable[bytes]) -> tuple[int, bytes]:
    """(size, MTH) of a sequence of leaf hashes, streaming: O(log n) memory."""
    stack: list[bytes] = []
    count = 0
    for leaf in leaves:
        h = leaf
        count += 1
        c = count
        while not c & 1:
            h = node_hash(stack.pop(), h)
            c >>= 1
        stack.append(h)
    if not stack:
        return 0, EMPTY_ROOT
    return count, fold(stack)


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2."""
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2 (a proof between equal sizes is empty and the roots are equal)."""
    if not 0 < first <= second or any(len(p) != HASH_SIZE for p in proof):
        return False
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == first_root and sr == second_root and sn == 0


class MemoryTree:
    """A whole tree in memory (tests, the bench's bulk path, the offline verifier)."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.nodes: dict[int, bytes] = {}
        self._builder = TreeBuilder(0, {})
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return self._builder.size

    def append(self, leaf: bytes) -> None:
        self.nodes.update(self._builder.append(leaf))

    def root(self, size: int | None = None) -> bytes:
        n = self.size if size is None else size
        return range_hashes([(0, n)], self.nodes)[0] if n else EMPTY_ROOT

    def inclusion(self, index: int, size: int) -> list[bytes]:
        return range_hashes(inclusion_ranges(index, size), self.nodes)

    def consistency(self, first: int, second: int) -> list[bytes]:
        return range_hashes(consistency_ranges(first, second), self.nodes)


HashFn = Callable[[bytes], bytes]
