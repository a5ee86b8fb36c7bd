"""Precedence between the YAML file and run-time changes: last writer wins.

Each user's ``receive_method``, ``agent_phone`` and web ``password_hash`` has two writers: the
operator editing the YAML, and run-time changes (CLI or API, by an admin or
the user).  The state database remembers when each YAML value was first seen
with its current content; a run-time change made after that wins, and a later
edit of that value in the YAML wins over an older run-time change.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

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


class SeenTimes(Protocol):
    """When a YAML value was first seen with its content (0.0: never)."""

    def get(self, key: Key, default: float, /) -> float: ...


class SeenAt:
    """When each YAML value was first seen with its current content.

    Nearly every value is first seen at one moment (the start that recorded the
    YAML, or the day the users were imported), so once built (``compact``) each
    field keeps that most common time once and only the users whose time differs:
    with 100,000 users three 100,000-entry dicts (12 MB in every process) become a
    few entries.  Asked for a user nobody noted, it answers the field's common
    time: callers ask only for the users of the policy it was built for, which are
    all noted."""

    def __init__(self) -> None:
        self._by_field: dict[str, dict[str, float]] = {field: {} for field in FIELDS}
        self._common: dict[str, float] = {}
        self._times: dict[float, float] = {}

    @classmethod
    def compacted(cls, common: Mapping[str, float], differing: Mapping[str, dict[str, float]]) -> SeenAt:
        """One already compact: each field's common time, and the users whose time differs."""
        seen = cls()
        seen._common.update(common)
        for field, by_user in differing.items():
            seen._by_field[field] = by_user
        return seen

    def common(self, field: str) -> float | None:
        """After ``compact``: the field's most common time (None: nothing noted for it)."""
        return self._common.get(field)

    def note(self, user_id: str, field: str, at: float) -> None:
        self._by_field[field][user_id] = self._times.setdefault(at, at)

    def is_noted(self, user_id: str, field: str) -> bool:
        """Before ``compact``: was a time noted for this user's field?"""
        return user_id in self._by_field[field]

    def count(self, field: str) -> int:
        """Before ``compact``: how many users have a time noted for ``field``."""
        return len(self._by_field[field])

    def compact(self) -> None:
        """Keep each field's most common time once, and the others per user."""
        for field, by_user in self._by_field.items():
            if not by_user:
                continue
            common = Counter(by_user.values()).most_common(1)[0][0]
            self._common[field] = common
            self._by_field[field] = {user_id: at for user_id, at in by_user.items() if at != common}

    def get(self, key: Key, default: float = 0.0, /) -> float:
        user_id, field = key
        by_user = self._by_field.get(field)
        if by_user is None:
            return default
        found = by_user.get(user_id)
        if found is not None:
            return found
        return self._common.get(field, default)


class Sources(Mapping[Key, Effective]):
    """Where each changeable value comes from, worked out when asked: three records
    per user, built for every user on every change, would cost more than the change."""

    def __init__(self, policy: Policy, yaml_seen: SeenTimes, latest: Mapping[Key, Change]) -> None:
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


def apply(policy: Policy, yaml_seen: SeenTimes,
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
