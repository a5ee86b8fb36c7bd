"""The router's garbage-collection schedule: survivors frozen at a steady pace, so a
full collection never walks 100,000 bindings with the PJSIP thread stopped."""

from __future__ import annotations

import gc
import weakref

import pytest

from router.gcpolicy import Collector, building_to_keep


@pytest.fixture(autouse=True)
def thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


def test_survivors_are_frozen_once_the_interval_has_passed():
    collector = Collector(now=100.0, freeze_every=2.0, sweep_every=3600.0)
    kept = [Node() for _ in range(1000)]
    assert collector.tick(101.0) is None and gc.get_freeze_count() == 0      # not yet
    collector.tick(102.0)
    assert gc.get_freeze_count() >= len(kept)


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.peer, b.peer = b, a
    return weakref.ref(a)


def test_a_young_cycle_is_collected_before_the_freeze_not_frozen():
    collector = Collector(now=0.0, freeze_every=2.0, sweep_every=3600.0)
    thresholds = gc.get_threshold()
    gc.set_threshold(10**9)        # only the collector's own young collection may find it
    try:
        alive = cycle()
        assert alive() is not None
        collector.tick(2.0)
        assert alive() is None
    finally:
        gc.set_threshold(*thresholds)


def test_a_sweep_finds_a_cycle_that_died_after_it_was_frozen():
    collector = Collector(now=0.0, freeze_every=2.0, sweep_every=10.0)
    a, b = Node(), Node()
    a.peer, b.peer = b, a
    alive = weakref.ref(a)
    collector.tick(2.0)                        # frozen while in use
    del a, b                                   # then garbage, out of the collector's sight
    gc.collect()
    assert alive() is not None
    sweep = collector.tick(10.0)
    assert sweep is not None and alive() is None
    assert sweep.collected >= 2 and sweep.tracked == gc.get_freeze_count() > 0


def test_nothing_is_collected_or_frozen_while_something_long_lived_is_being_built():
    collector = Collector(now=0.0, freeze_every=2.0, sweep_every=3600.0)
    with building_to_keep():
        kept = [Node() for _ in range(100)]
        assert collector.tick(2.0) is None and gc.get_freeze_count() == 0
    assert gc.get_freeze_count() >= len(kept) and gc.isenabled()
