"""sip-router: operator commands.

Human-readable tables by default, ``--json`` for scripts.  Every refusal is a
RouterError printed as one line a person can act on, never a traceback, with an
exit status a script can test (``EXIT_*`` below).  ``main`` is the only place
the process exits.  The CLI reads and writes the state database the config names
but never creates one: only the router (``run``) and the web app (``web``) do.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

import router
from router import control_client
from router.config import DEFAULT_CONFIG, load_policy
from router.errors import ConfigError, NotFound, RouterError
from router.policy import authz
from router.policy.decide import CallRequest, Fork, PstnLeg, Redirect, Reject, chain_of, decide
from router.policy.model import Binding, Policy, RoutingMode
from router.policy.numbers import dialled
from router.runtime import PolicyState
from router.store.sqlite import (
    SCHEMA_VERSION,
    MissingDatabase,
    SqliteBindingStore,
    SqliteCallStore,
    SqlitePolicyStore,
    StateError,
    connect,
    describe,
    probe,
)
from router.web.password_cli import PasswordInputError, new_hash

INSTALLED_CONFIG = "/etc/sip-router/router.yaml"
DEFAULT_STATE_DIR = "/var/lib/sip-router"        # when the config names no state_dir

EXIT_OK = 0
EXIT_ERROR = 1          # a refused change, an unknown user or device, a failed reload, any other error
EXIT_USAGE = 2          # a mistyped command line, or an invalid configuration file
EXIT_STATE = 4          # the state database is missing, unreadable, or newer than this sip-router
EXIT_NOT_RUNNING = 5    # status, calls --live, unregister, reload: no router answers on its socket

EPILOG = f"""\
configuration file: -c FILE, else $SIP_ROUTER_CONFIG, else {DEFAULT_CONFIG} when it
exists in the current directory (a checkout), else {INSTALLED_CONFIG}.
A relative state_dir is relative to the configuration file; without one the state is in
{DEFAULT_STATE_DIR}.  Only `run` and `web` create the state database; the other
commands refuse when it is missing.  -c and --json go before or after the command.

exit status:
  0  done (also when a change would change nothing)
  1  refused or failed: a forbidden or invalid change, an unknown user or device, a reload
     the router did not make, any other request the router refused
  2  a mistyped command line, or an invalid configuration
  4  the state database is missing, unreadable, or newer than this sip-router
  5  the router is not running (status, calls --live, unregister, reload)"""


def default_config() -> str:
    """The configuration file when no ``-c`` is given."""
    from_env = os.environ.get("SIP_ROUTER_CONFIG")
    if from_env:
        return from_env
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else INSTALLED_CONFIG


def version() -> str:
    try:
        return importlib.metadata.version("sip-router")
    except importlib.metadata.PackageNotFoundError:     # run from a checkout that was never installed
        return router.__version__


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


def _database(args: argparse.Namespace, policy: Policy) -> sqlite3.Connection:
    """The state database the config names; never a new one."""
    args.database = policy.database       # named by main() should SQLite fail later
    return connect(policy.database, create=False)


def _state(args: argparse.Namespace) -> tuple[PolicyState, sqlite3.Connection]:
    policy = load_policy(args.config, parallel=True)
    conn = _database(args, policy)
    return PolicyState(policy, SqlitePolicyStore(conn), time.time()), conn


def _user_id(policy: Policy, key: str | None, found: bool) -> str | None:
    """The user id of ``key`` (an id or an extension).  A user no longer in the YAML keeps
    their history, so an unknown key is refused only when nothing was ``found`` for it."""
    if key is None:
        return None
    user = policy.user(key)
    if user is None and not found:
        raise NotFound(f"no user or extension {key!r}")
    return user.id if user is not None else key


def cmd_check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    policy = load_policy(path, parallel=True)
    devices = sum(len(u.devices) for u in policy.users)
    summary = {"file": path, "users": len(policy.users), "devices": devices, "queues": len(policy.queues),
               "trunk": policy.trunk is not None, "database": policy.database}
    lines = [f"{path}: OK ({len(policy.users)} users, {devices} devices, "
             f"{len(policy.queues)} queues, trunk {'yes' if policy.trunk else 'no'})"]
    if policy.edge is not None:
        from router.edge.cli import describe_edge
        lines.append(f"edge: {describe_edge(policy.edge)} (render it with `sip-router edge-config`)")
    try:
        schema = probe(policy.database)
    except StateError:
        _emit(args, {**summary, "ok": False}, "\n".join(lines))
        raise
    summary["schema_version"] = schema
    if schema is None:
        lines.append(f"state: {policy.database} does not exist yet (the router makes it when it starts)")
    else:
        later = f", brought to {SCHEMA_VERSION} when next opened" if schema < SCHEMA_VERSION else ""
        lines.append(f"state: {policy.database} (schema version {schema}{later})")
    _emit(args, {**summary, "ok": True}, "\n".join(lines))
    return EXIT_OK


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
    return EXIT_OK


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
    authz.find_user(state.view.policy, args.user)     # an unknown user is an error, not a 404 to explain
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
    return EXIT_OK


def _change(args: argparse.Namespace, field: str, value: str) -> int:
    state, _ = _state(args)
    policy = state.view.policy
    # The same checks the change makes, first: a refused no-op must still be refused.
    target = authz.find_user(policy, args.user)
    authz.authorize(policy.user(args.actor), args.actor, target)
    current = state.view.sources[(target.id, field)].value
    if authz.normalize(policy, target, field, value) == current:
        _emit(args, {"user_id": target.id, "field": field, "value": current, "changed": False},
              f"{target.id}: {field} is already {current}; nothing changed")
        return EXIT_OK
    change = state.change(args.actor, args.user, field, value, via="cli", now=time.time())
    _emit(args, {**dataclasses.asdict(change), "changed": True},
          f"{change.user_id}: {field} {change.old or '-'} -> {change.new} (by {change.actor})")
    return EXIT_OK


def cmd_set_method(args: argparse.Namespace) -> int:
    return _change(args, "receive_method", args.method)


def cmd_set_phone(args: argparse.Namespace) -> int:
    return _change(args, "agent_phone", args.number)


def cmd_hash_password(_args: argparse.Namespace) -> int:
    try:
        print(new_hash())
    except PasswordInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_set_password(args: argparse.Namespace) -> int:
    # First: no password is asked for a database that is not there, or for a refused change.
    state, _ = _state(args)
    policy = state.view.policy
    authz.authorize(policy.user(args.actor), args.actor, authz.find_user(policy, args.user))
    try:
        hashed = new_hash()
    except PasswordInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    change = state.change(args.actor, args.user, "password_hash", hashed, via="cli", now=time.time())
    _emit(args, {"user": change.user_id, "field": "password", "by": change.actor, "via": change.via},
          f"{change.user_id}: web password set (by {change.actor})")
    return EXIT_OK


def _shown(field: str, value: str | None) -> str | None:
    """An audited value as shown: a password hash only as "(set)"."""
    return ("(set)" if value else None) if field in authz.HIDDEN else value


def cmd_audit(args: argparse.Namespace) -> int:
    state, _ = _state(args)
    user = state.view.policy.user(args.user) if args.user else None
    changes = state.store.audit(user.id if user else args.user, args.limit)
    _user_id(state.view.policy, args.user, bool(changes))
    rows = [{"id": c.id, "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.at)),
             "user": c.user_id, "field": c.field, "old": _shown(c.field, c.old), "new": _shown(c.field, c.new),
             "by": c.actor, "via": c.via} for c in changes]
    _emit(args, rows, _table(rows, ["id", "at", "user", "field", "old", "new", "by", "via"]))
    return EXIT_OK


def cmd_registrations(args: argparse.Namespace) -> int:
    policy = load_policy(args.config, parallel=True)
    now = time.time()
    bindings = SqliteBindingStore(_database(args, policy)).load(now)
    if args.user:
        user = authz.find_user(policy, args.user)
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
    return EXIT_OK


def cmd_calls(args: argparse.Namespace) -> int:
    if args.live:
        return _live_calls(args)
    policy = load_policy(args.config, parallel=True)
    user = policy.user(args.user) if args.user else None
    records = SqliteCallStore(_database(args, policy)).recent(user.id if user else args.user, args.limit)
    _user_id(policy, args.user, bool(records))
    fmt = "%Y-%m-%d %H:%M:%S"
    rows = [{"call_id": r.call_id, "started": time.strftime(fmt, time.localtime(r.started_at)),
             "caller": r.caller, "user": r.user_id, "queue": r.queue_id, "method": r.method,
             "branches": ",".join(r.branches) or None, "answered_by": r.answered_by,
             "status": r.status, "reason": r.reason,
             "duration_s": round(r.ended_at - r.answered_at, 1) if r.ended_at and r.answered_at else None}
            for r in records]
    _emit(args, rows, _table(rows, ["started", "caller", "user", "queue", "method", "branches",
                                    "answered_by", "status", "duration_s", "call_id"]))
    return EXIT_OK


# ------------------------------------------------------------------ the running router, over its socket

def _ask(args: argparse.Namespace, command: str, request: dict[str, Any] | None = None,
         timeout: float = control_client.TIMEOUT) -> Any:
    try:
        path = load_policy(args.config, parallel=True).control_socket
    except ConfigError:
        # an edit in progress: the router still runs, on its last good policy, at the same place
        draft = control_client.socket_of_draft(args.config, DEFAULT_STATE_DIR)
        if draft is None:
            raise
        path = draft
    return control_client.request(path, command, request, timeout)


def cmd_status(args: argparse.Namespace) -> int:
    status = _ask(args, "status")
    _emit(args, status, control_client.render_status(status if isinstance(status, dict) else {}))
    return EXIT_OK


def _live_calls(args: argparse.Namespace) -> int:
    result = _ask(args, "calls")
    calls = result.get("calls", []) if isinstance(result, dict) else result or []
    if args.user:
        try:                               # an extension names its user here as everywhere
            user = load_policy(args.config, parallel=True).user(args.user)
        except ConfigError:
            user = None
        wanted = {args.user, user.id if user else args.user}
        calls = [c for c in calls if c.get("user") in wanted]
    calls = calls[:args.limit]
    rows = control_client.live_call_rows(calls, time.time())
    _emit(args, calls, _table(rows, ["started", "for", "user", "queue", "method", "state", "branches",
                                     "answered_by", "call_id"]))
    return EXIT_OK


def cmd_unregister(args: argparse.Namespace) -> int:
    result = _ask(args, "unregister", {"device": args.device})
    _emit(args, result, control_client.render_unregister(result if isinstance(result, dict) else {}))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    result = _ask(args, "reload", timeout=control_client.RELOAD_TIMEOUT)
    result = result if isinstance(result, dict) else {}
    _emit(args, result, control_client.render_reload(result))
    return EXIT_OK if result.get("reloaded") else EXIT_ERROR


def cmd_edge_config(args: argparse.Namespace) -> int:
    from router.edge.cli import edge_config
    return edge_config(args.config, as_json=args.json)


def cmd_run(args: argparse.Namespace) -> int:
    from router.launch import run
    return run(args.config)


def cmd_web(args: argparse.Namespace) -> int:
    from router.web.server import run
    return run(args.config)


def _global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # On a command they must not reset what was given before it: argparse would put the
    # command's defaults over the top parser's values, so there they have none.
    unset = None if top else argparse.SUPPRESS
    parser.add_argument("-c", "--config", metavar="FILE", default=unset,
                        help=f"configuration file (default: $SIP_ROUTER_CONFIG, else {DEFAULT_CONFIG} "
                             f"when it exists here, else {INSTALLED_CONFIG})")
    parser.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sip-router", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser, top=True)
    parser.add_argument("--version", action="version", version=f"sip-router {version()}")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    command("check", cmd_check, "validate a policy file (every error with file:line:column) and "
                                "look at the state database it names").add_argument("file", nargs="?")
    command("run", cmd_run, "run the router (creates the state database when missing)")
    command("web", cmd_web, "run the agents' and admins' web app and its JSON API (the YAML's `web:` section)")
    command("edge-config", cmd_edge_config, "render the Kamailio edge and rtpengine set-up of the `edge:` "
                                            "section into the state directory, and check it")
    command("users", cmd_users, "users, their receive method and where it comes from")
    p = command("explain", cmd_explain, "what a call for USER would do right now, and why")
    p.add_argument("user")
    p.add_argument("--queue", help="queue id, as the X-Queue header would name it")
    p.add_argument("--called", metavar="N",
                   help="the dialled hotline/DID, in any form a PBX writes it: 842873001234, "
                        "+842873001234, 02873001234, tel:+84-28-7300-1234, sip:+842873001234@host")
    p.add_argument("--mode", choices=["proxy", "redirect"])
    for name, field, meta, func in (("set-method", "method", "METHOD", cmd_set_method),
                                    ("set-phone", "number", "NUMBER", cmd_set_phone)):
        p = command(name, func, f"change a user's {'receive method' if field == 'method' else 'agent phone'} "
                                "(audited; a value already in force writes nothing)")
        p.add_argument("user")
        p.add_argument(field, metavar=meta)
        p.add_argument("--as", dest="actor", required=True, help="who makes the change (user id)")
    command("hash-password", cmd_hash_password, "print the argon2id hash of a password, for password_hash "
                                                "in the YAML (asked on a terminal, else one line of stdin)")
    p = command("set-password", cmd_set_password, "set a user's web app password at run time (audited)")
    p.add_argument("user")
    p.add_argument("--as", dest="actor", required=True, help="who makes the change (user id)")
    p = command("registrations", cmd_registrations, "registered devices: contact, source, transport, expiry")
    p.add_argument("user", nargs="?")
    p = command("calls", cmd_calls, "call records, newest first; --live: the calls in progress now")
    p.add_argument("--user")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--live", action="store_true", help="ask the running router for its calls in progress")
    p = command("audit", cmd_audit, "run-time changes, newest first")
    p.add_argument("user", nargs="?")
    p.add_argument("--limit", type=int, default=100)
    command("status", cmd_status, "the running router: version, uptime, registrations, calls now, trunk, "
                                  "counters")
    p = command("unregister", cmd_unregister, "drop a device's registrations in the running router "
                                              "(the device registers again when it next refreshes)")
    p.add_argument("device", metavar="DEVICE")
    command("reload", cmd_reload, "make the running router validate and reload its YAML, and print the outcome")
    return parser


def _dispatch(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:            # --help, --version, or a mistyped command line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.config = args.config or default_config()
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration has {len(exc.problems)} error(s):", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    except MissingDatabase as exc:
        print(f"error: no state database at {exc.path} ({exc.reason}): start the router once "
              f"(sip-router run), or check state_dir in {args.config}", file=sys.stderr)
        return EXIT_STATE
    except StateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STATE
    except sqlite3.Error as exc:         # a page found damaged after the database opened
        print(f"error: state database {getattr(args, 'database', '?')}: {describe(exc)}", file=sys.stderr)
        return EXIT_STATE
    except control_client.RouterNotRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except RouterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _dispatch(argv)
        sys.stdout.flush()       # here, so a closed pipe is caught below, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader stopped reading (`sip-router audit | head -1`): what it wanted was written.
        # Point stdout at /dev/null so the exit's own flush does not fail a second time.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):    # stdout is no file (embedded, captured): nothing to silence
            pass
        return EXIT_OK
    except OSError as exc:               # a file the command needed (a certificate, the terminal)
        print(f"error: {describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
