"""The location service: who is registered where (Kamailio's usrloc); pure.

Theory of operation.  Bindings are kept per device (a device's whole set is
replaced at once, as the registrar decides it), with an index from user to
the devices that have bindings, so a call for a user reads only that user's
bindings.  Expiry goes by whole seconds: each device is filed under the second
at or after its earliest expiry, a heap holds those seconds, ``next_timer`` is
the earliest and ``expire(now)`` takes every second that is due and returns a
``SaveBindings`` for each device whose set shrank.  A binding is thus removed
within a second of its expiry; it is never routed to after it (every read
checks ``expires_at``).  Entries made stale by a later update are skipped when
their second comes, and the seconds are refiled when stale entries pile up.
``follow`` adopts a new policy: bindings of devices that are gone are dropped,
the others follow their device's current user and kind; ``follow_moves`` does
the same for a reload from a diff of the two policies worked out beforehand.

Memory: with 100,000 bindings every per-device object counts.  A device with one
binding, and a user with one registered device, is stored as that one object,
not as a one-element tuple, and a device waits for expiry as one list slot in
its second (not as a heap entry of its own); together ~11 MB less at 100,000.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from router.policy.model import Binding, Device, DeviceKind, Policy
from router.sip.commands import SaveBindings

T = TypeVar("T", Binding, str)


def _many(value: T | tuple[T, ...] | None) -> tuple[T, ...]:
    """A stored entry (none, one object, or a tuple of them) as a tuple."""
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


def _kind_of(devices: Sequence[Device], device_id: str) -> DeviceKind:
    for device in devices:
        if device.id == device_id:
            return device.kind
    raise KeyError(device_id)


class Location:
    def __init__(self, bindings: Iterable[Binding], now: float) -> None:
        # What ``put`` would make of each device, built in one go: 100,000 at start-up, so
        # without a list per device or a call per binding (~30 ms, not ~90 ms).
        by_device: dict[str, Binding | tuple[Binding, ...]] = {}
        known = by_device.get
        for b in bindings:
            if b.expires_at > now:
                value = known(b.device_id)
                by_device[b.device_id] = b if value is None else (*_many(value), b)
        self._by_device = by_device
        devices: dict[str, str | tuple[str, ...]] = {}    # user -> devices with bindings, sorted
        theirs = devices.get
        several: list[str] = []                            # users with more than one
        for device_id, value in by_device.items():
            user_id = value[0].user_id if isinstance(value, tuple) else value.user_id
            others = theirs(user_id)
            if others is None:
                devices[user_id] = device_id
            else:
                if isinstance(others, str):
                    several.append(user_id)
                devices[user_id] = (*_many(others), device_id)
        for user_id in several:
            devices[user_id] = tuple(sorted(_many(devices[user_id])))
        self._devices = devices
        self._due: dict[int, list[str]] = {}        # second -> devices that may expire then
        self._seconds: list[int] = []               # heap of the keys of ``_due``
        self._filed = 0                             # entries in ``_due``, stale ones included
        self._refile()

    def devices_of(self, user_id: str) -> tuple[str, ...]:
        """The user's devices that have bindings, sorted by id."""
        return _many(self._devices.get(user_id))

    def put(self, user_id: str, device_id: str, bindings: Sequence[Binding]) -> None:
        """The one place the indexes change: ``bindings`` is the device's whole set."""
        old = _many(self._by_device.get(device_id))
        if old and (not bindings or old[0].user_id != user_id):
            self._forget(old[0].user_id, device_id)
        if bindings:
            self._by_device[device_id] = bindings[0] if len(bindings) == 1 else tuple(bindings)
            devices = self.devices_of(user_id)
            if device_id not in devices:
                self._devices[user_id] = device_id if not devices else tuple(sorted((*devices, device_id)))
            self._file(min(b.expires_at for b in bindings), device_id)
            if self._filed > 4 * len(self._by_device) + 64:   # drop stale entries
                self._refile()
        else:
            self._by_device.pop(device_id, None)

    def _forget(self, user_id: str, device_id: str) -> None:
        devices = self.devices_of(user_id)
        if device_id not in devices:
            return
        rest = tuple(d for d in devices if d != device_id)
        if len(rest) > 1:
            self._devices[user_id] = rest
        elif rest:
            self._devices[user_id] = rest[0]
        else:
            del self._devices[user_id]

    def _file(self, expires_at: float, device_id: str) -> None:
        second = math.ceil(expires_at)
        waiting = self._due.get(second)
        if waiting is None:
            self._due[second] = [device_id]
            heapq.heappush(self._seconds, second)
        else:
            waiting.append(device_id)
        self._filed += 1

    def _refile(self) -> None:
        """File every device anew under its next expiry (what ``_file`` does one by one)."""
        due: dict[int, list[str]] = {}
        waiting = due.get
        ceil = math.ceil
        for device_id, value in self._by_device.items():
            second = ceil(min(b.expires_at for b in value) if isinstance(value, tuple) else value.expires_at)
            devices = waiting(second)
            if devices is None:
                due[second] = [device_id]
            else:
                devices.append(device_id)
        self._due = due
        self._seconds = list(due)
        heapq.heapify(self._seconds)
        self._filed = len(self._by_device)

    # ------------------------------------------------------------------ queries
    def of_device(self, device_id: str) -> tuple[Binding, ...]:
        return _many(self._by_device.get(device_id))

    def bindings(self, now: float, user_id: str | None = None) -> list[Binding]:
        if user_id is None:
            return [b for value in self._by_device.values() for b in _many(value) if b.expires_at > now]
        return [b for d in self.devices_of(user_id)
                for b in _many(self._by_device[d]) if b.expires_at > now]

    def is_registered(self, device_id: str, now: float) -> bool:
        return any(b.expires_at > now for b in self.of_device(device_id))

    def registered_at(self, device_id: str, host: str, port: int, now: float) -> bool:
        """Does ``device_id`` hold a live binding registered from ``host:port`` (behind the
        edge: the device's own address, as the edge saw it)?"""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return any(b.expires_at > now and b.device_address == address
                   for b in self.of_device(device_id))

    # ------------------------------------------------------------------ time
    def next_timer(self) -> float | None:
        return float(self._seconds[0]) if self._seconds else None

    def expire(self, now: float) -> list[SaveBindings]:
        """Drop expired bindings."""
        out: list[SaveBindings] = []
        while self._seconds and self._seconds[0] <= now:
            second = heapq.heappop(self._seconds)
            waiting = self._due.pop(second)
            self._filed -= len(waiting)
            for device_id in waiting:
                bs = self.of_device(device_id)
                if not bs or min(b.expires_at for b in bs) > second:
                    continue          # a stale entry: the device was updated since
                live = [b for b in bs if b.expires_at > now]
                if len(live) != len(bs):
                    out.append(SaveBindings(bs[0].user_id, device_id, tuple(live)))
                self.put(bs[0].user_id, device_id, live)     # refiled under its next expiry
        return out

    # ------------------------------------------------------------------ policy
    def follow_moves(self, moves: Mapping[str, tuple[str, DeviceKind] | None]) -> list[SaveBindings]:
        """Adopt a reload whose device changes ``ownership_moves`` worked out: only the
        devices that moved, changed kind or left are touched, not every binding."""
        changed: list[SaveBindings] = []
        for device_id, owner in moves.items():
            old = self.of_device(device_id)
            if not old:
                continue
            if owner is None:
                self.put(old[0].user_id, device_id, [])
                changed.append(SaveBindings(old[0].user_id, device_id, ()))
                continue
            user_id, kind = owner
            new = [replace(b, user_id=user_id, kind=kind) for b in old]
            self.put(user_id, device_id, new)
            changed.append(SaveBindings(user_id, device_id, tuple(new)))
        return changed

    def follow(self, policy: Policy) -> list[SaveBindings]:
        """Adopt a reloaded policy; only devices whose user or kind changed are touched."""
        changed: list[SaveBindings] = []
        # One pass over the users, not one per device; no tuple per device either: at a
        # start this runs on 100,000 bindings, nearly all of them unchanged.
        owners = {d.id: u for u in policy.users for d in u.devices}
        for device_id, value in list(self._by_device.items()):
            user = owners.get(device_id)
            if user is None:
                user_id = _many(value)[0].user_id
                self.put(user_id, device_id, [])
                changed.append(SaveBindings(user_id, device_id, ()))
                continue
            kind = _kind_of(user.devices, device_id)
            if isinstance(value, tuple):
                unchanged = all(b.user_id == user.id and b.kind is kind for b in value)
            else:                        # the usual lone binding: no generator for it
                unchanged = value.user_id == user.id and value.kind is kind
            if unchanged:
                continue
            new = [replace(b, user_id=user.id, kind=kind) for b in _many(value)]
            self.put(user.id, device_id, new)
            changed.append(SaveBindings(user.id, device_id, tuple(new)))
        return changed


def ownership_moves(old: Policy, new: Policy) -> dict[str, tuple[str, DeviceKind] | None]:
    """Devices whose user or kind differs between two policies (None: no longer listed).
    Proportional to the number of users: worked out off the PJSIP thread, before a reload."""
    before = {d.id: (u.id, d.kind) for u in old.users for d in u.devices}
    after = {d.id: (u.id, d.kind) for u in new.users for d in u.devices}
    return {device_id: after.get(device_id) for device_id, owner in before.items()
            if after.get(device_id) != owner}
