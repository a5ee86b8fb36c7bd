"""decide(): what to do with a call for a user, right now.

Theory of operation.  A user's *chain* is their receive method followed by
their fallback methods (the user's own list, else the deployment default).
``decide`` walks the chain from ``call.step``; each step either yields an
action (ring these devices / dial the agent's phone) or a reason why it
cannot (no device of that kind registered, no valid number, no hotline), and
the walk moves on.  The first step that yields an action is returned with the
index of the step after it, so that when ringing times out the proxy calls
``decide`` again with ``step=next_step``.  Every choice leaves a note that
``explain`` shows to a person.  In redirect mode all steps are folded into one
302 contact list, later steps at lower q, so the upstream PBX can do the same
walk itself.  Pure: no I/O; the clock is the ``now`` argument.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from router.policy.model import (
    DEVICE_KINDS,
    Binding,
    DeviceKind,
    Policy,
    Queue,
    ReceiveMethod,
    RoutingMode,
    Trunk,
    User,
)
from router.policy.numbers import dialled

TEMPORARILY_UNAVAILABLE = 480
NOT_FOUND = 404
REDIRECT_Q = (1.0, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class CallRequest:
    """What the proxy knows about an incoming INVITE that matters to policy."""

    user: str                          # Request-URI user part: user id or extension
    queue_header: str | None = None    # value of the queue header (X-Queue by default)
    called_number: str | None = None   # the dialled hotline/DID, when the peer tells it
    mode: RoutingMode = RoutingMode.PROXY
    may_use_trunk: bool = True         # False for a caller that must never reach the PSTN
    step: int = 0                      # where in the user's chain to start (fallback)


@dataclass(frozen=True)
class Target:
    uri: str
    q: float = 1.0
    device_id: str | None = None
    kind: DeviceKind | None = None
    binding: Binding | None = None


@dataclass(frozen=True)
class Fork:
    """Ring these registered devices in parallel; first answer wins."""

    user_id: str
    method: ReceiveMethod
    queue_id: str | None
    targets: tuple[Target, ...]
    ring_timeout: float
    next_step: int | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PstnLeg:
    """Call the agent's own phone through the trunk, from the queue hotline."""

    user_id: str
    method: ReceiveMethod
    queue_id: str | None
    number: str
    caller_id: str
    trunk: Trunk
    target: Target
    ring_timeout: float
    next_step: int | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Redirect:
    """Answer 302 with these contacts; the upstream PBX rings them."""

    user_id: str
    queue_id: str | None
    targets: tuple[Target, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reject:
    status: int
    reason: str
    notes: tuple[str, ...] = field(default=())


Decision = Fork | PstnLeg | Redirect | Reject


def chain_of(policy: Policy, user: User) -> tuple[ReceiveMethod, ...]:
    """The user's receive method then their fallbacks, without repeats."""
    fallback = user.fallback if user.fallback is not None else policy.routing.default_fallback
    out: list[ReceiveMethod] = []
    for method in (user.receive_method, *fallback):
        if method not in out:
            out.append(method)
    return tuple(out)


def resolve_queue(policy: Policy, user: User, call: CallRequest) -> tuple[Queue | None, str]:
    """The call's queue: header, then dialled hotline/DID, then the user's default.

    The called number may be written in any form ``numbers.dialled`` reads; one
    that is not a number, or no queue's hotline or DID, is said so in the note.
    """
    header = policy.routing.queue_header
    skipped: list[str] = []
    if call.queue_header:
        queue = policy.queue(call.queue_header.strip())
        if queue is not None:
            return queue, f"queue {queue.id!r} from the {header} header"
        skipped.append(f"{header} names unknown queue {call.queue_header!r}")
    if call.called_number:
        number = dialled(call.called_number, policy.country)
        shown = call.called_number if number in (None, call.called_number) else f"{call.called_number} ({number})"
        queue = policy.queue_for_number(number) if number is not None else None
        if queue is not None:
            return queue, "; ".join([*skipped, f"queue {queue.id!r} from the called number {shown}"])
        why = "matched no queue's hotline or DID" if number is not None else \
            f"is not a {policy.country} phone number, so it matched no queue's hotline or DID"
        skipped.append(f"the called number {shown} {why}")
    if user.default_queue:
        queue = policy.queue(user.default_queue)
        if queue is not None:
            return queue, "; ".join([*skipped, f"using the user's default queue {queue.id!r}"
                                     if skipped else f"queue {queue.id!r}: the user's default queue"])
    if not skipped:
        return None, f"no queue: no {header} header, no called number, no default queue"
    return None, "; ".join([*skipped, "and the user has no default queue: no queue"])


def live_bindings(bindings: Iterable[Binding], user_id: str, now: float) -> list[Binding]:
    return [b for b in bindings if b.user_id == user_id and b.expires_at > now]


def _ring_timeout(policy: Policy, user: User, queue: Queue | None) -> float:
    if user.ring_timeout is not None:
        return user.ring_timeout
    if queue is not None:
        return queue.ring_timeout
    return policy.routing.default_ring_timeout


def _device_step(method: ReceiveMethod, live: list[Binding],
                 notes: list[str]) -> tuple[Target, ...]:
    wanted = DEVICE_KINDS[method]
    targets: list[Target] = []
    for b in sorted(live, key=lambda b: (-b.q, b.device_id, b.contact)):
        if b.kind in wanted:
            targets.append(Target(uri=b.contact, q=b.q, device_id=b.device_id, kind=b.kind, binding=b))
        else:
            notes.append(f"skipped {b.device_id} ({b.kind.value}): {method.value} rings only "
                         f"{', '.join(sorted(k.value for k in wanted))}")
    if not targets:
        kinds = " or ".join(sorted(k.value for k in wanted))
        notes.append(f"{method.value}: no {kinds} device registered")
    return tuple(targets)


def _pstn_step(policy: Policy, user: User, queue: Queue | None, call: CallRequest,
               notes: list[str]) -> tuple[str, str, Target] | None:
    problems = []
    if not call.may_use_trunk:
        problems.append("the caller is not allowed to reach the PSTN trunk")
    if policy.trunk is None:
        problems.append("no trunk is configured")
    if user.agent_phone is None:
        problems.append(f"user {user.id!r} has no valid agent phone number")
    if queue is None:
        problems.append("the call has no queue, so no hotline to call from")
    elif queue.hotline is None:
        problems.append(f"queue {queue.id!r} has no hotline to call from")
    if problems:
        notes.append("agent_phone: " + "; ".join(problems))
        return None
    assert policy.trunk is not None and user.agent_phone is not None and queue is not None
    uri = policy.trunk.uri_for(user.agent_phone)
    notes.append(f"agent_phone: dial {user.agent_phone} via the trunk from hotline {queue.hotline}")
    return user.agent_phone, queue.hotline or "", Target(uri=uri)


def decide(policy: Policy, call: CallRequest, bindings: Iterable[Binding], now: float) -> Decision:
    """Decide what to do with ``call``; see the module docstring."""
    user = policy.user(call.user)
    if user is None:
        return Reject(NOT_FOUND, f"no user or extension {call.user!r}")
    queue, queue_note = resolve_queue(policy, user, call)
    notes = [queue_note]
    live = live_bindings(bindings, user.id, now)
    chain = chain_of(policy, user)
    ring = _ring_timeout(policy, user, queue)
    redirect_targets: list[Target] = []
    failures: list[str] = []
    for index in range(max(call.step, 0), len(chain)):
        method = chain[index]
        notes.append(f"step {index + 1}: {method.value}"
                     + (" (fallback)" if index > 0 else " (receive method)"))
        next_step = index + 1 if index + 1 < len(chain) else None
        if method is ReceiveMethod.AGENT_PHONE:
            pstn = _pstn_step(policy, user, queue, call, notes)
            if pstn is None:
                failures.append(notes[-1])
                continue
            number, caller_id, target = pstn
            if call.mode is RoutingMode.REDIRECT:
                redirect_targets.append(Target(uri=target.uri, q=_q(index - call.step)))
                continue
            return PstnLeg(user.id, method, queue.id if queue else None, number, caller_id,
                           policy.trunk, target, ring, next_step, tuple(notes))  # type: ignore[arg-type]
        targets = _device_step(method, live, notes)
        if not targets:
            failures.append(notes[-1])
            continue
        if call.mode is RoutingMode.REDIRECT:
            redirect_targets.extend(Target(t.uri, _q(index - call.step), t.device_id, t.kind, t.binding)
                                    for t in targets if t.uri not in {r.uri for r in redirect_targets})
            continue
        return Fork(user.id, method, queue.id if queue else None, targets, ring, next_step, tuple(notes))
    if redirect_targets:
        return Redirect(user.id, queue.id if queue else None, tuple(redirect_targets), tuple(notes))
    reason = "; ".join(failures) if failures else "no receive method left to try"
    return Reject(TEMPORARILY_UNAVAILABLE, reason, tuple(notes))


def _q(position: int) -> float:
    return REDIRECT_Q[min(position, len(REDIRECT_Q) - 1)]
