"""The small interfaces the router's stores implement (SQLite by default).

Like Kamailio's registrar/usrloc split: the logic that decides asks these for
facts and hands them records; how they are kept is the store's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from router.policy.effective import Change, Key, SeenTimes
from router.policy.model import Binding, Policy
from router.records import CallRecord


class PolicyStore(Protocol):
    def observe_yaml(self, policy: Policy, now: float) -> SeenTimes:
        """Record the YAML values now in force; return when each was first seen."""

    def latest_changes(self) -> dict[Key, Change]:
        """The newest run-time change per (user, field)."""

    def changes_after(self, marker: int) -> list[Change]:
        """The changes recorded after ``marker``, oldest first."""

    def record_change(self, change: Change) -> Change:
        """Store an accepted change in the audit trail; return it with its id."""

    def audit(self, user_id: str | None = None, limit: int = 100) -> list[Change]:
        """Newest first."""

    def change_marker(self) -> int:
        """A number that grows whenever a change is recorded (cheap to poll)."""


class DeviceBindings(Protocol):
    """The whole set of one device's bindings (the registrar's SaveBindings)."""

    @property
    def device_id(self) -> str: ...

    @property
    def bindings(self) -> tuple[Binding, ...]: ...


class BindingWriter(Protocol):
    """What the SIP engine needs: write binding sets (the registrar's decisions)."""

    def replace_many(self, sets: Iterable[DeviceBindings]) -> None:
        """Several devices' binding sets, in one transaction."""


class BindingStore(BindingWriter, Protocol):
    """The location service's durable copy: written by the engine, read at start and by the CLI."""

    def load(self, now: float, keep: Callable[[str], bool] | None = None,
             names: Mapping[str, str] | None = None, share: tuple[int, int] | None = None) -> list[Binding]:
        """Every binding not yet expired at ``now`` (with ``keep``: of the users it keeps;
        ``share``: (k, n), those users' ids hash to k modulo n, for the store to narrow
        the rows it reads; ``names``: id strings for the bindings to share)."""

    def purge_expired(self, now: float) -> int:
        """Delete bindings expired at ``now``; return how many."""


class CallWriter(Protocol):
    """What the SIP engine needs: write call records."""

    def save_many(self, records: Iterable[CallRecord]) -> None:
        """Insert or update call records by Call-ID."""


class CallStore(CallWriter, Protocol):
    """Call records: written by the engine, read by the CLI."""

    def recent(self, user_id: str | None = None, limit: int = 50) -> list[CallRecord]:
        """Newest first."""
