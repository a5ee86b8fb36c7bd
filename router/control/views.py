"""What the control socket's commands read and change; run on the PJSIP thread.

The SIP core's state (calls, dialogs, bindings) belongs to the PJSIP thread,
so these functions run there, handed over by ``OnLoop``: each is one pass
over the live calls or one device's bindings, built into plain dicts that the
control thread then encodes and sends.  ``gauges`` is the once-a-second
count the metrics and the systemd status line show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from router.metrics import Gauges, Tally, version
from router.policy.model import Policy
from router.sip.commands import SaveBindings
from router.sip.core import SipCore
from router.sip.engine import Engine
from router.sip.message import parse_name_addr
from router.sip.proxy import Call


@dataclass(frozen=True)
class Identity:
    """Facts about the process that do not change while it runs."""

    config: str
    started_at: float
    pid: int


def call_counts(core: SipCore) -> tuple[int, int]:
    """(ringing, answered) now: calls still waiting for a final answer, and open answered dialogs."""
    ringing = sum(1 for call in core.proxy.calls.values() if call.final_status is None)
    answered = sum(1 for d in core.proxy.dialogs.table.values() if not d.ended and d.record is not None)
    return ringing, answered


def gauges(core: SipCore, engine: Engine) -> Gauges:
    ringing, answered = call_counts(core)
    limit = core.policy.registrar.source_failures_per_minute
    throttled = sum(1 for stamps in core.auth.source_failures.values() if len(stamps) >= limit)
    registered = engine.trunk_state()[0] if engine.trunk is not None else None
    return Gauges(ringing, answered, throttled, registered)


def status(identity: Identity, core: SipCore, engine: Engine, tally: Tally, marker: int,
           now: float) -> dict[str, Any]:
    ringing, answered = call_counts(core)
    counters = {"requests": 0, "responses": 0, "sent": 0, "send_errors": 0, **engine.stats,
                **engine.commit.stats,
                "responses_sent": sum(tally.responses_sent.values()),
                "auth_failures": sum(tally.auth_failures.values()),
                "throttled": sum(tally.throttled.values())}
    return {
        "version": version(),
        "pid": identity.pid,
        "uptime_s": round(now - identity.started_at, 1),
        "started_at": identity.started_at,
        "config": identity.config,
        "database": core.policy.database,
        "policy_marker": marker,
        "users": len(core.policy.users),
        "registrations": tally.registrations_by_kind(),
        "registrations_by_transport": tally.registrations_by_transport(),
        "calls": {"ringing": ringing, "answered": answered},
        "trunk": trunk(core.policy, engine),
        "counters": counters,
    }


def trunk(policy: Policy, engine: Engine) -> dict[str, Any]:
    configured = policy.trunk
    if configured is None:
        return {"configured": False, "registered": None, "detail": "no trunk configured"}
    if engine.trunk is None:
        return {"configured": True, "registered": None,
                "detail": f"{configured.host}:{configured.port} without registration (no username and "
                          "password: the trunk is expected to trust the router's address)"}
    registered, detail = engine.trunk_state()
    return {"configured": True, "registered": registered, "detail": detail}


def calls(core: SipCore) -> dict[str, Any]:
    """The calls ringing now (the proxy's) and the answered ones not yet hung up (open dialogs)."""
    out: list[dict[str, Any]] = []
    for call in core.proxy.calls.values():
        if call.final_status is None:
            out.append(_ringing(call))
    for dialog in core.proxy.dialogs.table.values():
        record = dialog.record
        if dialog.ended or record is None:
            continue
        out.append({"call_id": record.call_id, "caller": record.caller, "user": record.user_id,
                    "queue": record.queue_id, "method": record.method, "state": "answered",
                    "branches": list(record.branches), "started_at": record.started_at,
                    "answered_at": record.answered_at, "answered_by": record.answered_by})
    out.sort(key=lambda c: c["started_at"])
    return {"calls": out}


def _ringing(call: Call) -> dict[str, Any]:
    try:
        caller = parse_name_addr(call.invite.header("from") or "").uri
    except ValueError:
        caller = ""
    return {"call_id": call.call_id, "caller": caller, "user": call.user_id, "queue": call.queue_id,
            "method": ">".join(call.steps), "state": "ringing",
            "branches": [branch.label for branch in call.active()], "started_at": call.started,
            "answered_at": None, "answered_by": None}


def unregister(core: SipCore, engine: Engine, device_id: str) -> dict[str, Any]:
    """Remove every binding of ``device_id``, stored as an expiry is (a ``SaveBindings``)."""
    bindings = core.location.of_device(device_id)
    if bindings:
        user_id = bindings[0].user_id
        core.location.put(user_id, device_id, [])
        engine.execute([SaveBindings(user_id, device_id, ())], acknowledges=False)
        engine.flush()            # answered once stored, as far as the database allows
    return {"device": device_id, "removed": len(bindings)}


def device_exists(policy: Policy, device_id: str) -> bool:
    return any(d.id == device_id for u in policy.users for d in u.devices)


def identity(config: str, started_at: float) -> Identity:
    return Identity(os.path.abspath(config), started_at, os.getpid())
