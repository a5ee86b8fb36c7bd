"""sip-router: operator commands.

Human-readable tables by default, ``--json`` for scripts.  Every refusal is a
RouterError printed as one line a person can act on, with exit status 1 (2 for
an invalid configuration).  ``main`` is the only place the process exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from router.config import DEFAULT_CONFIG, load_policy
from router.errors import ConfigError, NotFound, RouterError
from router.policy import authz
from router.policy.decide import CallRequest, Fork, PstnLeg, Redirect, Reject, chain_of, decide
from router.policy.model import Binding, RoutingMode
from router.policy.numbers import dialled
from router.runtime import PolicyState
from router.store.sqlite import SqliteBindingStore, SqliteCallStore, SqlitePolicyStore, connect
from router.web.password_cli import PasswordInputError, new_hash


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "") if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _state(args: argparse.Namespace) -> tuple[PolicyState, Any]:
    policy = load_policy(args.config)
    conn = connect(policy.database)
    return PolicyState(policy, SqlitePolicyStore(conn), time.time()), conn


def cmd_check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    policy = load_policy(path)
    devices = sum(len(u.devices) for u in policy.users)
    print(f"{path}: OK ({len(policy.users)} users, {devices} devices, "
          f"{len(policy.queues)} queues, trunk {'yes' if policy.trunk else 'no'})")
    if policy.edge is not None:
        from router.edge.cli import describe_edge
        print(f"edge: {describe_edge(policy.edge)} (render it with `sip-router edge-config`)")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    state, conn = _state(args)
    view = state.view
    bindings = SqliteBindingStore(conn).load(time.time())
    rows = []
    for u in view.policy.users:
        live = sorted({b.device_id for b in bindings if b.user_id == u.id})
        rows.append({
            "user": u.id, "name": u.display_name, "ext": u.extension, "role": u.role.value,
            "method": u.receive_method.value,
            "source": view.sources[(u.id, "receive_method")].source,
            "agent_phone": u.agent_phone,
            "fallback": ",".join(m.value for m in chain_of(view.policy, u)[1:]) or None,
            "devices": ",".join(f"{d.id}:{d.kind.value}{'*' if d.id in live else ''}"
                                for d in u.devices) or None,
        })
    _emit(args, rows, _table(rows, ["user", "name", "ext", "role", "method", "source",
                                    "agent_phone", "fallback", "devices"])
          + "\n(* = registered now)")
    return 0


def _describe(decision: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(decision, Fork):
        targets = [f"{t.device_id} ({t.kind.value if t.kind else '?'}) {t.uri}" for t in decision.targets]
        nxt = "" if decision.next_step is None else f"; on no answer after {decision.ring_timeout:g} s: next fallback"
        text = (f"FORK via {decision.method.value} to {len(targets)} device(s), ring "
                f"{decision.ring_timeout:g} s{nxt}:\n  " + "\n  ".join(targets))
        return text, {"action": "fork", "method": decision.method.value, "targets": targets,
                      "ring_timeout": decision.ring_timeout, "queue": decision.queue_id}
    if isinstance(decision, PstnLeg):
        text = (f"PSTN LEG to {decision.number} via {decision.target.uri}, caller ID "
                f"{decision.caller_id} (queue {decision.queue_id}), ring {decision.ring_timeout:g} s")
        return text, {"action": "pstn", "number": decision.number, "caller_id": decision.caller_id,
                      "uri": decision.target.uri, "queue": decision.queue_id}
    if isinstance(decision, Redirect):
        targets = [f"<{t.uri}>;q={t.q}" for t in decision.targets]
        return ("REDIRECT 302 with:\n  " + "\n  ".join(targets),
                {"action": "redirect", "contacts": targets, "queue": decision.queue_id})
    assert isinstance(decision, Reject)
    return (f"REJECT {decision.status}: {decision.reason}",
            {"action": "reject", "status": decision.status, "reason": decision.reason})


def cmd_explain(args: argparse.Namespace) -> int:
    state, conn = _state(args)
    now = time.time()
    bindings: list[Binding] = SqliteBindingStore(conn).load(now)
    mode = RoutingMode(args.mode) if args.mode else state.view.policy.routing.mode
    call = CallRequest(user=args.user, queue_header=args.queue, called_number=args.called, mode=mode)
    decision = decide(state.view.policy, call, bindings, now)
    text, data = _describe(decision)
    if args.called is not None:
        # the number as the router reads it (None: not a number), and the queue it selects
        number = dialled(args.called, state.view.policy.country)
        queue = state.view.policy.queue_for_number(number) if number else None
        data["called_number"] = {"as_given": args.called, "canonical": number,
                                 "queue": queue.id if queue else None}
    data["why"] = list(decision.notes)
    _emit(args, data, text + "\nwhy:\n  - " + "\n  - ".join(decision.notes or ("-",)))
    return 0


def _change(args: argparse.Namespace, field: str, value: str) -> int:
    state, _ = _state(args)
    change = state.change(args.actor, args.user, field, value, via="cli", now=time.time())
    _emit(args, change.__dict__,
          f"{change.user_id}: {field} {change.old or '-'} -> {change.new} (by {change.actor})")
    return 0


def cmd_set_method(args: argparse.Namespace) -> int:
    return _change(args, "receive_method", args.method)


def cmd_set_phone(args: argparse.Namespace) -> int:
    return _change(args, "agent_phone", args.number)


def cmd_hash_password(_args: argparse.Namespace) -> int:
    try:
        print(new_hash())
    except PasswordInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_set_password(args: argparse.Namespace) -> int:
    try:
        hashed = new_hash()
    except PasswordInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state, _ = _state(args)
    change = state.change(args.actor, args.user, "password_hash", hashed, via="cli", now=time.time())
    _emit(args, {"user": change.user_id, "field": "password", "by": change.actor, "via": change.via},
          f"{change.user_id}: web password set (by {change.actor})")
    return 0


def _shown(field: str, value: str | None) -> str | None:
    """An audited value as shown: a password hash only as "(set)"."""
    return ("(set)" if value else None) if field in authz.HIDDEN else value


def cmd_audit(args: argparse.Namespace) -> int:
    state, _ = _state(args)
    rows = [{"id": c.id, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.at)),
             "user": c.user_id, "field": c.field, "old": _shown(c.field, c.old), "new": _shown(c.field, c.new),
             "by": c.actor, "via": c.via} for c in state.store.audit(args.user, args.limit)]
    _emit(args, rows, _table(rows, ["id", "at", "user", "field", "old", "new", "by", "via"]))
    return 0


def cmd_registrations(args: argparse.Namespace) -> int:
    policy = load_policy(args.config)
    now = time.time()
    bindings = SqliteBindingStore(connect(policy.database)).load(now)
    if args.user:
        user = policy.user(args.user)
        if user is None:
            raise NotFound(f"no user or extension {args.user!r}")
        bindings = [b for b in bindings if b.user_id == user.id]
    # source/transport: the device's own address and transport (behind the edge, as the edge
    # saw it); via: "edge" when calls reach it through the edge's Path; reached_at: how calls
    # find it ("path", "contact" as written, or "source" when a NAT was seen).
    rows = [{"user": b.user_id, "device": b.device_id, "kind": b.kind.value, "contact": b.contact,
             "source": b.device_address, "transport": b.device_transport,
             "via": "edge" if b.via_edge else "direct",
             "reached_at": "path" if b.via_edge else "contact" if b.at_contact else "source",
             "path": list(b.path) or None,
             "expires_in": int(b.expires_at - now), "q": b.q, "user_agent": b.user_agent or None}
            for b in sorted(bindings, key=lambda b: (b.user_id, b.device_id, b.contact))]
    _emit(args, rows, _table(rows, ["user", "device", "kind", "contact", "source", "transport", "via",
                                    "reached_at", "expires_in", "user_agent"]))
    return 0


def cmd_calls(args: argparse.Namespace) -> int:
    policy = load_policy(args.config)
    records = SqliteCallStore(connect(policy.database)).recent(args.user, args.limit)
    fmt = "%Y-%m-%d %H:%M:%S"
    rows = [{"call_id": r.call_id, "started": time.strftime(fmt, time.localtime(r.started_at)),
             "caller": r.caller, "user": r.user_id, "queue": r.queue_id, "method": r.method,
             "branches": ",".join(r.branches) or None, "answered_by": r.answered_by,
             "status": r.status, "reason": r.reason,
             "duration_s": round(r.ended_at - r.answered_at, 1) if r.ended_at and r.answered_at else None}
            for r in records]
    _emit(args, rows, _table(rows, ["started", "caller", "user", "queue", "method", "branches",
                                    "answered_by", "status", "duration_s", "call_id"]))
    return 0


def cmd_edge_config(args: argparse.Namespace) -> int:
    from router.edge.cli import edge_config
    return edge_config(args.config, as_json=args.json)


def cmd_run(args: argparse.Namespace) -> int:
    from router.app import run
    return run(args.config)


def cmd_web(args: argparse.Namespace) -> int:
    from router.web.server import run
    return run(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sip-router", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=os.environ.get("SIP_ROUTER_CONFIG", DEFAULT_CONFIG),
                        help=f"policy file (default: $SIP_ROUTER_CONFIG or {DEFAULT_CONFIG})")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a policy file and list every error with file:line")
    p.add_argument("file", nargs="?")
    p.set_defaults(func=cmd_check)
    sub.add_parser("run", help="run the router").set_defaults(func=cmd_run)
    sub.add_parser("web", help="run the agents' and admins' web app and its JSON API (the YAML's `web:` section)"
                   ).set_defaults(func=cmd_web)
    sub.add_parser("edge-config", help="render the Kamailio edge and rtpengine set-up of the `edge:` section "
                                       "into the state directory, and check it").set_defaults(func=cmd_edge_config)
    sub.add_parser("users", help="users, their receive method and where it comes from").set_defaults(func=cmd_users)
    p = sub.add_parser("explain", help="what a call for USER would do right now, and why")
    p.add_argument("user")
    p.add_argument("--queue", help="queue id, as the X-Queue header would name it")
    p.add_argument("--called", metavar="N",
                   help="the dialled hotline/DID, in any form a PBX writes it: 842873001234, "
                        "+842873001234, 02873001234, tel:+84-28-7300-1234, sip:+842873001234@host")
    p.add_argument("--mode", choices=["proxy", "redirect"])
    p.set_defaults(func=cmd_explain)
    for name, field, meta, func in (("set-method", "method", "METHOD", cmd_set_method),
                                    ("set-phone", "number", "NUMBER", cmd_set_phone)):
        p = sub.add_parser(name, help=f"change a user's {'receive method' if field == 'method' else 'agent phone'}")
        p.add_argument("user")
        p.add_argument(field, metavar=meta)
        p.add_argument("--as", dest="actor", required=True, help="who makes the change (user id)")
        p.set_defaults(func=func)
    sub.add_parser("hash-password", help="print the argon2id hash of a password, for password_hash in the YAML "
                                         "(asked on a terminal, else one line of stdin)"
                   ).set_defaults(func=cmd_hash_password)
    p = sub.add_parser("set-password", help="set a user's web app password at run time (audited)")
    p.add_argument("user")
    p.add_argument("--as", dest="actor", required=True, help="who makes the change (user id)")
    p.set_defaults(func=cmd_set_password)
    p = sub.add_parser("registrations", help="registered devices: contact, source, transport, expiry")
    p.add_argument("user", nargs="?")
    p.set_defaults(func=cmd_registrations)
    p = sub.add_parser("calls", help="call records, newest first")
    p.add_argument("--user")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_calls)
    p = sub.add_parser("audit", help="run-time changes, newest first")
    p.add_argument("user", nargs="?")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration has {len(exc.problems)} error(s):", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    except RouterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
