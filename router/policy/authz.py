"""Who may change whose receive method or agent phone, and what values are valid.

The customer's rule: an Admin may set anyone's receive method (the switchboard
configuration); an agent may set only their own (from the softphone).
"""

from __future__ import annotations

from router.errors import Forbidden, InvalidChange, NotFound
from router.policy.model import Policy, ReceiveMethod, Role, User
from router.policy.numbers import canonical

FIELDS = ("receive_method", "agent_phone", "password_hash")
HIDDEN = frozenset({"password_hash"})       # shown as "(set)" in audits, never the value


def authorize(actor: User | None, actor_key: str, target: User) -> None:
    """Raise ``Forbidden`` unless ``actor`` may change ``target``."""
    if actor is None:
        raise Forbidden(f"{actor_key!r} is not a user of this router; "
                        "changes must be made as an existing admin or as the user themself")
    if actor.role is Role.ADMIN or actor.id == target.id:
        return
    raise Forbidden(f"{actor.id} is an agent and may change only their own settings, "
                    f"not {target.id}'s; ask an admin")


def find_user(policy: Policy, key: str) -> User:
    user = policy.user(key)
    if user is None:
        raise NotFound(f"no user or extension {key!r}")
    return user


def normalize(policy: Policy, target: User, field: str, value: str) -> str:
    """The canonical value to store, or an error a person can act on.

    ``target`` carries the *effective* settings, so switching to agent_phone
    is checked against the number in force now.
    """
    if field == "receive_method":
        try:
            method = ReceiveMethod(value)
        except ValueError:
            raise InvalidChange(f"{value!r} is not a receive method; use one of "
                                + ", ".join(m.value for m in ReceiveMethod)) from None
        if method is ReceiveMethod.AGENT_PHONE:
            if target.agent_phone is None:
                raise InvalidChange(f"{target.id} has no agent phone number; "
                                    "set one first (set-phone) and then choose agent_phone")
            if policy.trunk is None:
                raise InvalidChange("no PSTN trunk is configured, so agent_phone cannot ring")
        return method.value
    if field == "agent_phone":
        return canonical(value, policy.country)
    if field == "password_hash":             # the caller hashed the password (router.web.passwords)
        if not value.startswith("$argon2id$"):
            raise InvalidChange("a password is stored only as an argon2id hash")
        return value
    raise InvalidChange(f"{field!r} cannot be changed at run time; use one of {', '.join(FIELDS)}")
