"""Precedence between the YAML file and run-time changes: last writer wins.

Each user's ``receive_method``, ``agent_phone`` and web ``password_hash`` has two writers: the
operator editing the YAML, and run-time changes (CLI or API, by an admin or
the user).  The state database remembers when each YAML value was first seen
with its current content; a run-time change made after that wins, and a later
edit of that value in the YAML wins over an older run-time change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from router.policy.model import Policy, ReceiveMethod, User

Key = tuple[str, str]  # (user id, field)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


def apply(policy: Policy, yaml_seen: Mapping[Key, float],
          latest: Mapping[Key, Change]) -> tuple[Policy, dict[Key, Effective]]:
    """The policy with run-time changes that win laid over the YAML values."""
    sources: dict[Key, Effective] = {}
    users: list[User] = []
    for user in policy.users:
        values: dict[str, str | None] = {}
        for field in FIELDS:
            key = (user.id, field)
            eff = effective(yaml_value(user, field), yaml_seen.get(key, 0.0), latest.get(key))
            sources[key] = eff
            values[field] = eff.value
        method = values["receive_method"]
        users.append(dataclasses.replace(
            user,
            receive_method=ReceiveMethod(method) if method else user.receive_method,
            agent_phone=values["agent_phone"], password_hash=values["password_hash"]))
    return dataclasses.replace(policy, users=tuple(users)), sources
