"""The location service: who is registered where (Kamailio's usrloc); pure.

Theory of operation.  Bindings are kept per device (a device's whole set is
replaced at once, as the registrar decides it), with an index from user to
the devices that have bindings, so a call for a user reads only that user's
bindings.  A heap of (earliest expiry, device) drives expiry: ``next_timer``
is its top, ``expire(now)`` pops what is due and returns a ``SaveBindings``
for each device whose set shrank.  Heap entries made stale by a later update
are skipped when popped and the heap is rebuilt when stale entries pile up.
``follow`` adopts a new policy: bindings of devices that are gone are dropped,
the others follow their device's current user and kind; ``follow_moves`` does
the same for a reload from a diff of the two policies worked out beforehand.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from router.policy.model import Binding, DeviceKind, Policy
from router.sip.commands import SaveBindings


class Location:
    def __init__(self, bindings: Iterable[Binding], now: float) -> None:
        # What ``put`` would make of each device, built in one go: 100,000 at start-up.
        # Tuples, not lists and sets: with 100,000 bindings a one-element set per user
        # and a list per device cost ~20 MB more than these.
        grouped: dict[str, list[Binding]] = {}
        for b in bindings:
            if b.expires_at > now:
                grouped.setdefault(b.device_id, []).append(b)
        self.by_device: dict[str, tuple[Binding, ...]] = {d: tuple(bs) for d, bs in grouped.items()}
        del grouped
        self.devices_of: dict[str, tuple[str, ...]] = {}        # user -> devices with bindings, sorted
        for device_id, bs in self.by_device.items():
            user_id = bs[0].user_id
            self.devices_of[user_id] = (*self.devices_of.get(user_id, ()), device_id)
        for user_id, devices in self.devices_of.items():
            if len(devices) > 1:
                self.devices_of[user_id] = tuple(sorted(devices))
        # heap of (expires_at, device)
        self.expiries = [(min(b.expires_at for b in bs), device_id) for device_id, bs in self.by_device.items()]
        heapq.heapify(self.expiries)

    def put(self, user_id: str, device_id: str, bindings: Sequence[Binding]) -> None:
        """The one place the indexes change: ``bindings`` is the device's whole set."""
        old = self.by_device.get(device_id)
        if old and (not bindings or old[0].user_id != user_id):
            self._forget(old[0].user_id, device_id)
        if bindings:
            self.by_device[device_id] = tuple(bindings)
            devices = self.devices_of.get(user_id, ())
            if device_id not in devices:
                self.devices_of[user_id] = tuple(sorted((*devices, device_id)))
            heapq.heappush(self.expiries, (min(b.expires_at for b in bindings), device_id))
            if len(self.expiries) > 4 * len(self.by_device) + 64:   # drop stale entries
                self.expiries = [(min(b.expires_at for b in bs), d) for d, bs in self.by_device.items()]
                heapq.heapify(self.expiries)
        else:
            self.by_device.pop(device_id, None)

    def _forget(self, user_id: str, device_id: str) -> None:
        devices = self.devices_of.get(user_id)
        if devices is None or device_id not in devices:
            return
        rest = tuple(d for d in devices if d != device_id)
        if rest:
            self.devices_of[user_id] = rest
        else:
            del self.devices_of[user_id]

    # ------------------------------------------------------------------ queries
    def of_device(self, device_id: str) -> tuple[Binding, ...]:
        return self.by_device.get(device_id, ())

    def bindings(self, now: float, user_id: str | None = None) -> list[Binding]:
        if user_id is None:
            return [b for bs in self.by_device.values() for b in bs if b.expires_at > now]
        return [b for d in self.devices_of.get(user_id, ())
                for b in self.by_device[d] if b.expires_at > now]

    def is_registered(self, device_id: str, now: float) -> bool:
        return any(b.expires_at > now for b in self.by_device.get(device_id, ()))

    def registered_at(self, device_id: str, host: str, port: int, now: float) -> bool:
        """Does ``device_id`` hold a live binding registered from ``host:port`` (behind the
        edge: the device's own address, as the edge saw it)?"""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return any(b.expires_at > now and b.device_address == address
                   for b in self.by_device.get(device_id, ()))

    # ------------------------------------------------------------------ time
    def next_timer(self) -> float | None:
        return self.expiries[0][0] if self.expiries else None

    def expire(self, now: float) -> list[SaveBindings]:
        """Drop expired bindings."""
        out: list[SaveBindings] = []
        while self.expiries and self.expiries[0][0] <= now:
            _, device_id = heapq.heappop(self.expiries)
            bs = self.by_device.get(device_id)
            if not bs:
                continue          # a stale heap entry: the device was updated since
            live = [b for b in bs if b.expires_at > now]
            if len(live) != len(bs):
                out.append(SaveBindings(bs[0].user_id, device_id, tuple(live)))
                self.put(bs[0].user_id, device_id, live)
        return out

    # ------------------------------------------------------------------ policy
    def follow_moves(self, moves: Mapping[str, tuple[str, DeviceKind] | None]) -> list[SaveBindings]:
        """Adopt a reload whose device changes ``ownership_moves`` worked out: only the
        devices that moved, changed kind or left are touched, not every binding."""
        changed: list[SaveBindings] = []
        for device_id, owner in moves.items():
            old = self.by_device.get(device_id)
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
        owners = {d.id: (u, d) for u in policy.users for d in u.devices}   # one pass, not one per device
        for device_id in list(self.by_device):
            owner = owners.get(device_id)
            old = self.by_device[device_id]
            if owner is None:
                self.put(old[0].user_id, device_id, [])
                changed.append(SaveBindings(old[0].user_id, device_id, ()))
                continue
            user, device = owner
            if all(b.user_id == user.id and b.kind is device.kind for b in old):
                continue
            new = [replace(b, user_id=user.id, kind=device.kind) for b in old]
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
