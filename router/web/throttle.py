"""Failed-login throttling: per user name from one client, and per client, in sliding windows.

Kept in memory: the web app is one process, and a restart forgetting the counts
costs an attacker a restart, not the throttle.  A name that is not a user is
counted exactly like a real one, so the answers never tell the two apart.
"""

from __future__ import annotations

import ipaddress
import math
import threading
from collections import deque

USER_WINDOW = 15 * 60.0      # max_login_failures counts bad passwords for one user in 15 minutes
ADDRESS_WINDOW = 60.0        # address_failures_per_minute counts bad logins from one address
MAX_TRACKED = 10_000         # keys kept per window; the oldest are dropped beyond that


class Throttled(Exception):
    """Too many failed logins: try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int, scope: str) -> None:
        self.retry_after = retry_after
        self.scope = scope               # "user" or "address"
        super().__init__(f"too many failed logins for this {scope}; try again in {retry_after} s")


class _Window:
    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self.failures: dict[str, deque[float]] = {}

    def _live(self, key: str, now: float) -> deque[float] | None:
        times = self.failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.seconds:
            times.popleft()
        if not times:
            del self.failures[key]
            return None
        return times

    def wait(self, key: str, now: float) -> int:
        """Seconds until ``key`` may try again (0: now)."""
        times = self._live(key, now)
        if times is None or len(times) < self.limit:
            return 0
        # the attempt that frees a slot is the one that made the count reach the limit
        return max(1, math.ceil(times[len(times) - self.limit] + self.seconds - now))

    def add(self, key: str, now: float) -> None:
        times = self._live(key, now)
        if times is None:
            if len(self.failures) >= MAX_TRACKED:      # forget the key whose last failure is oldest
                self.failures.pop(next(iter(self.failures)))
            times = deque()
        else:
            del self.failures[key]                      # re-inserted last: the dict is ordered by last failure
        self.failures[key] = times
        times.append(now)

    def clear(self, key: str) -> None:
        self.failures.pop(key, None)


class LoginThrottle:
    def __init__(self, max_user_failures: int, address_failures_per_minute: int) -> None:
        self._users = _Window(max_user_failures, USER_WINDOW)
        self._addresses = _Window(address_failures_per_minute, ADDRESS_WINDOW)
        self._lock = threading.Lock()

    def check(self, user_key: str, address: str, now: float) -> None:
        """Raise ``Throttled`` when either the name (from this address) or the address must wait."""
        with self._lock:
            wait = self._users.wait(_pair(user_key, address), now)
            if wait:
                raise Throttled(wait, "user")
            wait = self._addresses.wait(network_of(address), now)
            if wait:
                raise Throttled(wait, "address")

    def failed(self, user_key: str, address: str, now: float) -> None:
        with self._lock:
            self._users.add(_pair(user_key, address), now)
            self._addresses.add(network_of(address), now)

    def succeeded(self, user_key: str, address: str) -> None:
        """A good password clears the name's count from that address (not the address's)."""
        with self._lock:
            self._users.clear(_pair(user_key, address))


def network_of(address: str) -> str:
    """Who is counted as one client: an IPv4 address, or an IPv6 /64 (one host's share)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _pair(user_key: str, address: str) -> str:
    # Per user *and* client: someone guessing lan's password from one place must not
    # lock lan out everywhere; guessing from many places runs into each place's limit.
    return f"{user_key.lower()}|{network_of(address)}"
