"""When Python's cyclic garbage collector may run in the router.

Nearly everything the router keeps for long (users, bindings, nonces, calls) is
acyclic and freed by reference counting.  The cyclic collector is still needed
for the odd short-lived cycle, but its full (oldest-generation) pass walks every
tracked object: with 100,000 bindings that was 50-210 ms with the PJSIP thread
stopped, and during a log-in wave it ran every few seconds as the bindings grew.

So objects that have survived the young collections are frozen at a steady pace
(``gc.freeze`` is a constant-time list splice): full passes then only see what
arrived since, and stay short.  Frozen objects are still freed by reference
counting; only a cycle among them that became garbage after freezing would wait,
so a full sweep of everything runs rarely, and logs what it found, so a leak
shows rather than grows silently.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

FREEZE_EVERY = 2.0             # seconds between freezes of the survivors
SWEEP_EVERY = 6 * 3600.0       # seconds between full sweeps of frozen objects too


@dataclass(frozen=True)
class Sweep:
    seconds: float
    collected: int
    tracked: int


class Collector:
    """Driven from the router's once-a-second tick, on the PJSIP thread."""

    def __init__(self, now: float, freeze_every: float = FREEZE_EVERY, sweep_every: float = SWEEP_EVERY) -> None:
        self.freeze_every = freeze_every
        self.sweep_every = sweep_every
        self.next_freeze = now + freeze_every
        self.next_sweep = now + sweep_every

    def start(self) -> None:
        """After start-up: what is loaded now lives for the whole run.  Frozen without a
        collection first: start-up builds with the collector paused and makes no cycles
        worth one (a full pass took ~100 ms per worker at 100,000 users, found a handful
        of objects, and delayed the first answer); the periodic sweep collects them."""
        gc.freeze()

    def tick(self, now: float) -> Sweep | None:
        if not gc.isenabled():
            return None            # something long-lived is being built (a reload): it freezes it
        if now >= self.next_sweep:
            self.next_sweep = now + self.sweep_every
            self.next_freeze = now + self.freeze_every
            return self.sweep()
        if now >= self.next_freeze:
            self.next_freeze = now + self.freeze_every
            gc.collect(1)          # the young generations only: short-lived cycles go first
            gc.freeze()
        return None

    @staticmethod
    def sweep() -> Sweep:
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        return Sweep(time.perf_counter() - started, collected, gc.get_freeze_count())


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a policy is built: a YAML node tree and a
    policy hold no reference cycles, and with millions of young objects the collector
    would walk them again and again (three quarters of the time at 100,000 users)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def building_to_keep() -> Iterator[None]:
    """Build something that will live long (a reloaded policy, its indexes) with the
    collector paused, then freeze it.  Built with the collector running, 100,000 users
    would be walked by young and full collections alike, each a single pause of the
    whole process (the PJSIP thread included) of 100-500 ms."""
    with paused_gc():
        try:
            yield
        finally:
            gc.freeze()            # before the collector runs again
