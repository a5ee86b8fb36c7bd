"""What the pages and the API show, built from the policy, bindings and records; pure.

"What would ring right now" is ``decide()`` itself, asked about a call through the
user's default queue, exactly as ``sip-router explain USER`` asks it: the pages never
re-derive who rings.  Each device the decision leaves out gets the reason a person
needs (not logged in, or not a kind the method rings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from router.policy import authz
from router.policy.decide import CallRequest, Decision, Fork, PstnLeg, Redirect, Reject, chain_of, decide
from router.policy.effective import Change, Effective, Key
from router.policy.model import Binding, DeviceKind, Policy, ReceiveMethod, User
from router.records import CallRecord

IN_PROGRESS_FOR = 12 * 3600.0                  # an answered call with no BYE seen for this long is not shown as live


@dataclass(frozen=True)
class DeviceState:
    device_id: str
    kind: DeviceKind
    registered: bool
    rings: bool
    why_not: str | None            # "not_registered" | "not_this_kind" | "phone_number" | None (it rings)
    transport: str | None = None   # of the first live binding
    user_agent: str | None = None


@dataclass(frozen=True)
class RingPreview:
    """What a call for the user would do now (a call through their default queue)."""

    action: str                    # "ring" | "phone" | "redirect" | "unavailable"
    method: ReceiveMethod | None   # the step that acts (the receive method, or a fallback)
    fallback_step: bool            # True when the receive method itself has nothing to ring
    devices: tuple[DeviceState, ...]
    number: str | None             # agent_phone: the number dialled ...
    caller_id: str | None          # ... from this hotline
    queue: str | None
    ring_timeout: float | None
    reason: str | None             # unavailable: why, in the router's words
    notes: tuple[str, ...]         # decide()'s notes, as `explain` prints them

    @property
    def ringing(self) -> tuple[DeviceState, ...]:
        return tuple(d for d in self.devices if d.rings)


def decision_for(policy: Policy, user: User, bindings: Iterable[Binding], now: float) -> Decision:
    return decide(policy, CallRequest(user=user.id, mode=policy.routing.mode), bindings, now)


def preview(policy: Policy, user: User, bindings: Iterable[Binding], now: float) -> RingPreview:
    live = [b for b in bindings if b.user_id == user.id and b.expires_at > now]
    decision = decision_for(policy, user, live, now)
    rung = _rung_devices(decision)
    method = decision.method if isinstance(decision, (Fork, PstnLeg)) else None
    devices = []
    for device in user.devices:
        mine = [b for b in live if b.device_id == device.id]
        if device.id in rung:
            why = None
        elif not mine:
            why = "not_registered"
        elif isinstance(decision, PstnLeg):
            why = "phone_number"
        else:
            why = "not_this_kind"
        devices.append(DeviceState(device.id, device.kind, bool(mine), device.id in rung, why,
                                   mine[0].device_transport if mine else None,
                                   (mine[0].user_agent or None) if mine else None))
    action = {Fork: "ring", PstnLeg: "phone", Redirect: "redirect", Reject: "unavailable"}[type(decision)]
    return RingPreview(
        action=action, method=method, fallback_step=method is not None and method is not user.receive_method,
        devices=tuple(devices),
        number=decision.number if isinstance(decision, PstnLeg) else None,
        caller_id=decision.caller_id if isinstance(decision, PstnLeg) else None,
        queue=None if isinstance(decision, Reject) else decision.queue_id,
        ring_timeout=decision.ring_timeout if isinstance(decision, (Fork, PstnLeg)) else None,
        reason=decision.reason if isinstance(decision, Reject) else None,
        notes=decision.notes)


def option_previews(policy: Policy, user: User, bindings: Iterable[Binding],
                    now: float) -> dict[ReceiveMethod, RingPreview]:
    """For each receive method, what it alone would do now (no fallback): shown beside
    each choice so a person sees the effect before saving."""
    live = list(bindings)
    out = {}
    for method in ReceiveMethod:
        alone = dataclasses.replace(user, receive_method=method, fallback=())
        what_if = dataclasses.replace(policy, users=tuple(alone if u.id == user.id else u for u in policy.users))
        out[method] = preview(what_if, alone, live, now)
    return out


def _rung_devices(decision: Decision) -> set[str]:
    if isinstance(decision, (Fork, Redirect)):
        return {t.device_id for t in decision.targets if t.device_id is not None}
    return set()


def fallback_of(policy: Policy, user: User) -> tuple[ReceiveMethod, ...]:
    return chain_of(policy, user)[1:]


def last_changes(latest: Mapping[Key, Change]) -> dict[str, Change]:
    """Each user's newest run-time change, whatever the field."""
    out: dict[str, Change] = {}
    for (user_id, _), change in latest.items():
        if user_id not in out or change.id > out[user_id].id:
            out[user_id] = change
    return out


def shown_value(field: str, value: str | None) -> str | None:
    """An audited value as it may be shown: a password hash only as "(set)"."""
    if field in authz.HIDDEN:
        return "(set)" if value else None
    return value


def change_row(change: Change) -> dict[str, object]:
    return {"id": change.id, "at": change.at, "user": change.user_id, "field": change.field,
            "old": shown_value(change.field, change.old), "new": shown_value(change.field, change.new),
            "by": change.actor, "via": change.via}


def user_row(policy: Policy, sources: Mapping[Key, Effective], user: User, live: Iterable[Binding],
             last: Change | None) -> dict[str, object]:
    """One user as the staff list and the API show them."""
    registered: dict[str, list[str]] = {}
    for b in live:
        if b.user_id == user.id:
            registered.setdefault(b.kind.value, [])
            if b.device_id not in registered[b.kind.value]:
                registered[b.kind.value].append(b.device_id)
    method_source = sources.get((user.id, "receive_method"))
    phone_source = sources.get((user.id, "agent_phone"))
    return {
        "id": user.id, "name": user.display_name, "extension": user.extension, "role": user.role.value,
        "receive_method": user.receive_method.value,
        "receive_method_source": method_source.source if method_source else "yaml",
        "receive_method_since": method_source.since if method_source else None,
        "agent_phone": user.agent_phone,
        "agent_phone_source": phone_source.source if phone_source else "yaml",
        "fallback": [m.value for m in fallback_of(policy, user)],
        "default_queue": user.default_queue,
        "devices": [{"id": d.id, "kind": d.kind.value,
                     "registered": d.id in registered.get(d.kind.value, [])} for d in user.devices],
        "registered": registered,
        "has_password": user.password_hash is not None,
        "last_change": change_row(last) if last else None,
    }


def matches(row: Mapping[str, object], text: str = "", method: str = "", queue: str = "") -> bool:
    """The staff list's search (id, name, extension, agent phone) and filters."""
    if method and row["receive_method"] != method:
        return False
    if queue and row["default_queue"] != queue:
        return False
    needle = text.strip().lower()
    if needle:
        hay = " ".join(str(row[k] or "") for k in ("id", "name", "extension", "agent_phone")).lower()
        return needle in hay
    return True


def call_row(record: CallRecord) -> dict[str, object]:
    return {"call_id": record.call_id, "started_at": record.started_at, "caller": record.caller,
            "user": record.user_id, "queue": record.queue_id, "method": record.method,
            "branches": list(record.branches), "answered_by": record.answered_by, "status": record.status,
            "reason": record.reason, "answered_at": record.answered_at, "ended_at": record.ended_at,
            "duration": (record.ended_at - record.answered_at) if record.ended_at and record.answered_at else None}


def in_progress(record: CallRecord, now: float) -> bool:
    """Answered and no BYE seen yet.  The router writes a call record when the call gets
    its final answer, so a call still ringing is not in the records at all."""
    return (record.answered_at is not None and record.ended_at is None and 200 <= record.status < 300
            and now - record.answered_at < IN_PROGRESS_FOR)


def registration_row(b: Binding, now: float) -> dict[str, object]:
    return {"user": b.user_id, "device": b.device_id, "kind": b.kind.value, "contact": b.contact,
            "source": b.device_address, "transport": b.device_transport,
            "via": "edge" if b.via_edge else "direct", "expires_in": int(b.expires_at - now),
            "user_agent": b.user_agent or None, "registered_at": b.registered_at}
