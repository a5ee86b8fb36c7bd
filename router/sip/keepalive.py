"""NAT keep-alive: OPTIONS pings to bindings reached through a NAT mapping; pure.

Theory of operation.  A UDP binding the router reaches at the REGISTER's
source rather than its Contact (``reach.needs_keepalive``) lives on a NAT
mapping that closes after a minute or so of silence.  Every such binding gets
an OPTIONS every ``interval`` seconds, sent where its calls would go (through
the edge's Path when it has one).  Any answer from the device keeps it; a 408,
430 or 477 is the edge saying the device did not answer, which counts as
silence (the ping stays outstanding).  After ``max_missed`` pings in a row without an answer the binding is
dropped (logged ``register.keepalive.dropped``): calls stop ringing a device
that is gone instead of waiting out its registration.

One heap of (due, device, contact) holds the next ping of each watched
binding; the timer pops only what is due, so a tick costs what it sends, not
the number of bindings.  A binding that was refreshed, moved or removed since
it was scheduled is looked up again when its entry comes due.  A REGISTER
refresh counts as an answer.  Pings are recognised by their Via branch.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from router.policy.model import Binding
from router.sip import ids
from router.sip.commands import Log, SaveBindings, Send
from router.sip.forward import Local, our_via, render
from router.sip.location import Location
from router.sip.message import SipMessage
from router.sip.reach import destination, needs_keepalive

BRANCH_PREFIX = "z9hG4bKka"
SILENT = frozenset({408, 430, 477, 503})     # the edge answering for a device that did not
SERVER = "sip-router/0.1"

Key = tuple[str, str]                        # (device, contact)


@dataclass
class Watch:
    missed: int = 0
    outstanding: str | None = None           # the branch of the ping not yet answered


class Keepalive:
    def __init__(self, local: Local, location: Location, domain: str,
                 interval: float, max_missed: int) -> None:
        self.local = local
        self.location = location
        self.domain = domain
        self.interval = interval
        self.max_missed = max_missed
        self.watched: dict[Key, Watch] = {}
        self.by_branch: dict[str, Key] = {}
        self.heap: list[tuple[float, str, str]] = []

    def configure(self, domain: str, interval: float, max_missed: int) -> None:
        """A reloaded policy's settings; pings already scheduled keep their time."""
        self.domain, self.interval, self.max_missed = domain, interval, max_missed

    def watch(self, bindings: Iterable[Binding], now: float) -> None:
        """Registered or refreshed bindings: a refresh proves the device is there."""
        if self.interval <= 0:
            return
        for b in bindings:
            if not needs_keepalive(b):
                continue
            key = (b.device_id, b.contact)
            watch = self.watched.get(key)
            if watch is None:
                self.watched[key] = Watch()
                # spread the first pings over the interval: bindings loaded at start-up
                # must not all be pinged in the same tick, and stay in step ever after
                spread = 0.5 + (zlib.crc32(f"{b.device_id}|{b.contact}".encode()) % 1000) / 2000
                heapq.heappush(self.heap, (now + self.interval * spread, b.device_id, b.contact))
            else:
                watch.missed = 0
                self._forget_ping(watch)

    def next_timer(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def handle_timer(self, now: float) -> list[Send | SaveBindings | Log]:
        out: list[Send | SaveBindings | Log] = []
        while self.heap and self.heap[0][0] <= now:
            _, device_id, contact = heapq.heappop(self.heap)
            key = (device_id, contact)
            watch = self.watched.get(key)
            if watch is None:
                continue
            binding = self._binding(key, now)
            if binding is None or self.interval <= 0 or not needs_keepalive(binding):
                self._forget_ping(watch)
                del self.watched[key]
                continue
            if watch.outstanding is not None:
                watch.missed += 1
                self._forget_ping(watch)
                if watch.missed >= self.max_missed:
                    del self.watched[key]
                    out.extend(self._drop(binding, watch.missed, now))
                    continue
            try:
                out.append(self._ping(binding, watch))
            except ValueError as exc:       # a stored route that no longer parses: stop pinging it
                del self.watched[key]
                out.append(Log("register.keepalive.error", (("device", device_id), ("contact", contact),
                                                             ("detail", str(exc))), "warning"))
                continue
            heapq.heappush(self.heap, (now + self.interval, device_id, contact))
        return out

    def is_ping(self, response: SipMessage) -> bool:
        return response.top_via.branch.startswith(BRANCH_PREFIX)

    def on_response(self, response: SipMessage) -> None:
        key = self.by_branch.pop(response.top_via.branch, None)
        if key is None or response.status < 200:
            if key is not None:
                self.by_branch[response.top_via.branch] = key     # a provisional: wait for the final
            return
        watch = self.watched.get(key)
        if watch is None or response.status in SILENT:
            return          # the ping stays outstanding: the next tick counts it as missed
        watch.outstanding = None
        watch.missed = 0

    # ------------------------------------------------------------------ helpers
    def _binding(self, key: Key, now: float) -> Binding | None:
        for b in self.location.of_device(key[0]):
            if b.contact == key[1] and b.expires_at > now:
                return b
        return None

    def _forget_ping(self, watch: Watch) -> None:
        if watch.outstanding is not None:
            self.by_branch.pop(watch.outstanding, None)
            watch.outstanding = None

    def _ping(self, binding: Binding, watch: Watch) -> Send:
        dest, routes = destination(binding)
        branch = f"{BRANCH_PREFIX}{ids.token_hex(8)}{self.local.mark}"
        watch.outstanding = branch
        self.by_branch[branch] = (binding.device_id, binding.contact)
        headers = [("via", our_via(self.local, branch, dest.transport)), ("max-forwards", "70"),
                   *(("route", r) for r in routes),
                   ("from", f"<sip:keepalive@{self.domain}>;tag={ids.token_hex(6)}"),
                   ("to", f"<{binding.contact}>"), ("call-id", f"ka-{ids.token_hex(10)}"),
                   ("cseq", "1 OPTIONS"), ("user-agent", SERVER)]
        return Send(render(f"OPTIONS {binding.contact} SIP/2.0", headers, b""),
                    dest.host, dest.port, dest.transport, dest.conn)

    def _drop(self, binding: Binding, missed: int, now: float) -> list[SaveBindings | Log]:
        kept = [b for b in self.location.of_device(binding.device_id) if b.contact != binding.contact]
        self.location.put(binding.user_id, binding.device_id, kept)
        log = Log("register.keepalive.dropped",
                  (("user", binding.user_id), ("device", binding.device_id), ("contact", binding.contact),
                   ("source", binding.device_address), ("missed", missed),
                   ("after_s", int(now - binding.registered_at))), "warning")
        return [SaveBindings(binding.user_id, binding.device_id, tuple(kept)), log]

