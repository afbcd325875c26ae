"""``trustplane.startup``: the long-lived objects of a started server process leave the cyclic
collector's walks (``gc.freeze``), without freezing garbage. Run in a child interpreter: freezing
the test process itself would keep the suite's objects for its whole run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import gc, json, weakref
    from trustplane.startup import freeze_after_start

    class Node:
        pass

    def cycle():  # garbage only the cyclic collector frees
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    report = {}
    dead_before = cycle()
    kept = [Node() for _ in range(1000)]
    freeze_after_start()
    report["cycle_before_freed"] = dead_before() is None
    report["frozen_at_start"] = gc.get_freeze_count()
    report["tracked_left"] = sum(gc.get_count())
    warm = [[Node()] for _ in range(5000)]  # what the first requests keep
    dead_after = cycle()
    gc.collect(0)
    report["frozen_after_young"] = gc.get_freeze_count()
    gc.collect()  # the first full collection after the start: its survivors are frozen
    report["cycle_after_freed"] = dead_after() is None
    report["frozen_after_full"] = gc.get_freeze_count()
    later = [[Node()] for _ in range(3000)]
    gc.collect()  # disarmed: later full collections freeze nothing
    report["frozen_after_second_full"] = gc.get_freeze_count()
    report["gen2_walk"] = len(gc.get_objects(2))
    print(json.dumps(report))
    """
)


def test_a_started_process_freezes_its_objects_and_the_warm_up_survivors_once() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    )
    report = __import__("json").loads(out.stdout)
    # the start: what was alive is frozen, the garbage was collected first (not frozen)
    assert report["cycle_before_freed"] is True
    assert report["frozen_at_start"] > 1000
    assert report["frozen_after_young"] == report["frozen_at_start"]  # young collections: no
    # the first full collection after the start freezes its survivors (the warm-up's 10,000
    # objects: 5,000 lists and 5,000 nodes), and collected the new garbage first
    assert report["cycle_after_freed"] is True
    assert report["frozen_after_full"] >= report["frozen_at_start"] + 10_000
    # once only: a later full collection leaves the new objects to the collector
    assert report["frozen_after_second_full"] == report["frozen_after_full"]
    assert report["gen2_walk"] >= 6_000
