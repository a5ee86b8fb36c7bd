"""The policy in force: the YAML policy with winning run-time changes applied.

Used by the CLI (and later the HTTP API) to make changes, and by the router
process to get the policy its calls are decided by.  Authorization and value
checks happen before anything is written; a refused change writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from router.policy import authz
from router.policy.effective import Change, Effective, Key, SeenTimes, apply
from router.policy.model import Policy
from router.store.interfaces import PolicyStore


@dataclass(frozen=True)
class PolicyView:
    """The effective policy and where each changeable value came from."""

    policy: Policy
    sources: Mapping[Key, Effective]
    marker: int


@dataclass(frozen=True)
class PreparedReload:
    """A reloaded YAML policy worked out on another thread, ready to adopt in one step."""

    yaml_policy: Policy
    seen: SeenTimes
    latest: dict[Key, Change]
    view: PolicyView


def prepare_view(yaml_policy: Policy, store: PolicyStore, now: float) -> PreparedReload:
    """Everything a reload costs per user, on the calling thread with its own ``store``:
    record the YAML's values, lay the run-time changes over them, build the lookups."""
    seen = store.observe_yaml(yaml_policy, now)
    marker = store.change_marker()
    latest = store.latest_changes()
    policy, sources = apply(yaml_policy, seen, latest)
    build_lookups(policy)               # here, not where it is adopted
    return PreparedReload(yaml_policy, seen, latest, PolicyView(policy, sources, marker))


def build_lookups(policy: Policy) -> None:
    """Build the policy's lookup indexes now (by id and extension, by credential): built
    lazily, they would cost the first REGISTER or call ~75 ms at 100,000 users, on the
    thread that routes."""
    policy.user("")
    policy.device_by_auth("")


class PolicyState:
    def __init__(self, yaml_policy: Policy, store: PolicyStore, now: float) -> None:
        self.store = store
        self.yaml_policy = yaml_policy
        self._seen = store.observe_yaml(yaml_policy, now)
        self._marker = store.change_marker()
        self._latest = store.latest_changes()
        self.view = self._build()
        build_lookups(self.view.policy)     # at start-up, before the first message

    def _build(self, yaml_policy: Policy | None = None, seen: SeenTimes | None = None) -> PolicyView:
        policy, sources = apply(yaml_policy or self.yaml_policy, self._seen if seen is None else seen,
                                self._latest)
        return PolicyView(policy, sources, self._marker)

    def _catch_up(self) -> None:
        """Read only the changes recorded since the last look (not the whole history)."""
        for change in self.store.changes_after(self._marker):
            self._latest[(change.user_id, change.field)] = change
            self._marker = max(self._marker, change.id)

    def reload(self, yaml_policy: Policy, now: float) -> PolicyView:
        """Adopt a newly validated YAML policy (the caller validated it).  If the
        state database fails on the way, nothing changes: the old policy stays."""
        return self.adopt(prepare_view(yaml_policy, self.store, now))

    def adopt(self, prepared: PreparedReload) -> PolicyView:
        """Take a prepared reload in; costs nothing per user unless a run-time change
        was recorded since it was prepared."""
        marker = self.store.change_marker()
        self.yaml_policy, self._seen, self._latest = prepared.yaml_policy, prepared.seen, prepared.latest
        self._marker = prepared.view.marker
        self.view = prepared.view
        if marker != prepared.view.marker:
            self._catch_up()
            self.view = self._build()
        return self.view

    def refresh(self) -> bool:
        """Pick up changes made by another process; True when something changed."""
        if self.store.change_marker() == self.view.marker:
            return False
        self._catch_up()
        self.view = self._build()
        return True

    def change(self, actor_key: str, user_key: str, field: str, value: str,
               via: str, now: float) -> Change:
        """Apply one change as ``actor_key``; raise a RouterError if refused."""
        policy = self.view.policy
        target = authz.find_user(policy, user_key)
        authz.authorize(policy.user(actor_key), actor_key, target)
        new = authz.normalize(policy, target, field, value)
        old = self.view.sources[(target.id, field)].value
        actor = policy.user(actor_key)
        assert actor is not None
        change = self.store.record_change(
            Change(target.id, field, old, new, actor.id, via, now))
        self._catch_up()
        self.view = self._build()
        return change
