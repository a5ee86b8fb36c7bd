"""Precedence between the YAML file and run-time changes: last writer wins.

Each user's ``receive_method``, ``agent_phone`` and web ``password_hash`` has two writers: the
operator editing the YAML, and run-time changes (CLI or API, by an admin or
the user).  The state database remembers when each YAML value was first seen
with its current content; a run-time change made after that wins, and a later
edit of that value in the YAML wins over an older run-time change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from router.policy.model import Policy, ReceiveMethod, User

Key = tuple[str, str]  # (user id, field)


@dataclass(frozen=True, slots=True)
class Change:
    """One accepted run-time change, as audited."""

    user_id: str
    field: str
    old: str | None
    new: str | None
    actor: str
    via: str
    at: float
    id: int = 0


@dataclass(frozen=True, slots=True)
class Effective:
    value: str | None
    source: str   # "yaml" or "runtime"
    since: float  # when that writer wrote it


# Every per-user value with two writers, the YAML and run-time changes.
FIELDS = ("receive_method", "agent_phone", "password_hash")


def yaml_value(user: User, field: str) -> str | None:
    if field == "receive_method":
        return user.receive_method.value
    if field == "agent_phone":
        return user.agent_phone
    if field == "password_hash":
        return user.password_hash
    raise KeyError(field)


def effective(yaml: str | None, yaml_seen_at: float, change: Change | None) -> Effective:
    """The winning value: the later of the YAML's observation and the change."""
    if change is not None and change.at > yaml_seen_at:
        return Effective(change.new, "runtime", change.at)
    return Effective(yaml, "yaml", yaml_seen_at)


class SeenAt(Mapping[Key, float]):
    """When each YAML value was first seen with its current content, kept per field
    and keyed by the policy's own user-id strings, with each distinct time stored once:
    a tuple key and a float per value would cost ~50 MB at 100,000 users."""

    def __init__(self) -> None:
        self._by_field: dict[str, dict[str, float]] = {field: {} for field in FIELDS}
        self._times: dict[float, float] = {}

    def note(self, user_id: str, field: str, at: float) -> None:
        self._by_field[field][user_id] = self._times.setdefault(at, at)

    def of_field(self, field: str) -> Mapping[str, float]:
        return self._by_field[field]

    def __getitem__(self, key: Key) -> float:
        user_id, field = key
        by_user = self._by_field.get(field)
        if by_user is None:
            raise KeyError(key)
        return by_user[user_id]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        by_user = self._by_field.get(key[1])
        return by_user is not None and key[0] in by_user

    def __iter__(self) -> Iterator[Key]:
        return ((user_id, field) for field, by_user in self._by_field.items() for user_id in by_user)

    def __len__(self) -> int:
        return sum(len(by_user) for by_user in self._by_field.values())


class Sources(Mapping[Key, Effective]):
    """Where each changeable value comes from, worked out when asked: three records
    per user, built for every user on every change, would cost more than the change."""

    def __init__(self, policy: Policy, yaml_seen: Mapping[Key, float], latest: Mapping[Key, Change]) -> None:
        self._policy = policy
        self._seen = yaml_seen
        self._latest = latest

    def __getitem__(self, key: Key) -> Effective:
        user_id, field = key
        user = self._policy.user(user_id)
        if user is None or user.id != user_id or field not in FIELDS:
            raise KeyError(key)
        return effective(yaml_value(user, field), self._seen.get(key, 0.0), self._latest.get(key))

    def __iter__(self) -> Iterator[Key]:
        return ((user.id, field) for user in self._policy.users for field in FIELDS)

    def __len__(self) -> int:
        return len(self._policy.users) * len(FIELDS)


def apply(policy: Policy, yaml_seen: Mapping[Key, float],
          latest: Mapping[Key, Change]) -> tuple[Policy, Sources]:
    """The policy with run-time changes that win laid over the YAML values.

    Only users with a winning change are copied; the others, and the policy's
    lookup indexes, are shared with the YAML policy."""
    sources = Sources(policy, yaml_seen, latest)
    winners = {user_id for (user_id, field), change in latest.items()
               if change.at > yaml_seen.get((user_id, field), 0.0)}
    replaced: dict[str, User] = {}
    for user_id in winners:
        user = policy.user(user_id)
        if user is None or user.id != user_id:
            continue                     # a user no longer in the YAML
        values = {field: sources[(user_id, field)].value for field in FIELDS}
        method = values["receive_method"]
        replaced[user_id] = dataclasses.replace(
            user,
            receive_method=ReceiveMethod(method) if method else user.receive_method,
            agent_phone=values["agent_phone"], password_hash=values["password_hash"])
    return policy.replacing_users(replaced), sources
