"""The CLI's side of the running router's control socket, and how its answers are shown.

The router serves a Unix socket at ``<state_dir>/control.sock`` (or the config's
``control.socket``).  One request per connection: the client sends one JSON line
``{"command": ..., "args": {...}}`` and reads one JSON line back,
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.
Nothing here touches the state database: what the socket reports is the router's
memory (calls ringing now, the trunk's registration), which the database does not hold.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import yaml

from router.errors import RouterError

SOCKET_NAME = "control.sock"   # in state_dir, unless the config's control.socket says otherwise
# Seconds to wait for an answer: longer than the router waits for its own SIP loop (5 s), so
# a stuck loop is reported by the router, in its words; a reload also reads the YAML and may
# look the trunk up in DNS first.
TIMEOUT = 10.0
RELOAD_TIMEOUT = 30.0
MAX_ANSWER = 16 * 1024 * 1024  # a router that never ends its line must not eat the CLI's memory


class RouterNotRunning(RouterError):
    """Nothing listens on the control socket."""


class ControlError(RouterError):
    """The router refused the request, or its answer could not be read."""


def socket_of_draft(config_path: str, default_state_dir: str) -> str | None:
    """The control socket named by a config file that does not validate (an edit in
    progress: the running router still serves its socket where the last good file said).
    Only ``state_dir`` and ``control.socket`` are read; None when not even they can be."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    state_dir, control = data.get("state_dir", default_state_dir), data.get("control") or {}
    name = control.get("socket", SOCKET_NAME) if isinstance(control, dict) else None
    if not isinstance(state_dir, str) or not state_dir or not isinstance(name, str) or not name:
        return None
    base = os.path.dirname(os.path.abspath(config_path))
    return os.path.join(os.path.normpath(os.path.join(base, state_dir)), name)


def request(path: str, command: str, args: dict[str, Any] | None = None,
            timeout: float = TIMEOUT) -> Any:
    """Send one command and return the router's ``result``.

    ``RouterNotRunning`` when no router listens at ``path``; ``ControlError`` when the
    socket cannot be used, the router does not answer within ``timeout``, or refuses.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            # refused: a socket file left by a router that was killed
            raise RouterNotRunning(f"the router is not running (no socket at {path})") from None
        except PermissionError:
            raise ControlError(f"may not use the control socket {path}: run this as the router's "
                               "user (sip-router) or root") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the router at {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
            answer = _read_line(sock)
        except TimeoutError:
            raise ControlError(f"the router did not answer {command!r} within {timeout:g} s (socket {path}); "
                               "it may still carry it out: see its log") from None
        except OSError as exc:
            raise ControlError(f"the router closed the connection during {command!r}: "
                               f"{exc.strerror or exc}") from None
    return _result(answer, command)


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_ANSWER:
            raise ControlError(f"the router's answer is over {MAX_ANSWER // (1024 * 1024)} MiB without an end")
    return b"".join(chunks)


def _result(answer: bytes, command: str) -> Any:
    if not answer.strip():
        raise ControlError(f"the router closed the connection without answering {command!r}")
    try:
        message = json.loads(answer)
    except (UnicodeDecodeError, ValueError):
        raise ControlError(f"the router's answer to {command!r} is not JSON: {answer[:80]!r}") from None
    if not isinstance(message, dict) or "ok" not in message:
        raise ControlError(f"the router's answer to {command!r} has no \"ok\": {answer[:80]!r}")
    if not message["ok"]:
        raise ControlError(str(message.get("error") or f"the router refused {command!r}"))
    return message.get("result")


# ------------------------------------------------------------------ readable answers

def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days} d"] if days else []
    if days or hours:
        parts.append(f"{hours} h")
    parts.append(f"{minutes} min" if days or hours or minutes else f"{secs} s")
    return " ".join(parts)


def _counts(values: Any) -> str:
    if not isinstance(values, dict) or not values:
        return "none"
    return ", ".join(f"{key} {values[key]}" for key in sorted(values))


def render_status(status: dict[str, Any]) -> str:
    """``sip-router status`` for a person: one line per subject."""
    registrations = status.get("registrations") or {}
    total = sum(v for v in registrations.values() if isinstance(v, int)) if isinstance(registrations, dict) else 0
    calls = status.get("calls") or {}
    trunk = status.get("trunk") or {}
    if not trunk.get("configured"):
        trunk_line = "not configured"
    elif trunk.get("registered") is None:          # a trunk that trusts the router's address
        trunk_line = str(trunk.get("detail") or "configured, no registration")
    else:
        trunk_line = "registered" if trunk["registered"] else "NOT registered"
        if trunk.get("detail"):
            trunk_line += f" ({trunk['detail']})"
    uptime = status.get("uptime_s")
    lines = [
        f"sip-router {status.get('version', '?')}, pid {status.get('pid', '?')}, "
        f"up {_duration(uptime) if isinstance(uptime, int | float) else '?'}",
        f"config: {status.get('config', '?')} (policy marker {status.get('policy_marker', '?')})",
        f"registrations: {total} ({_counts(registrations)}); by transport: "
        f"{_counts(status.get('registrations_by_transport'))}",
        f"calls now: {calls.get('ringing', 0)} ringing, {calls.get('answered', 0)} answered",
        f"trunk: {trunk_line}",
        f"counters: {_counts(status.get('counters'))}",
    ]
    workers = status.get("workers")
    if isinstance(workers, list) and workers:
        lines.append(f"workers: {len(workers)}: " + "; ".join(
            (f"{w.get('worker')} pid {w.get('pid')}, {w.get('registrations', 0)} registrations"
             if "error" not in w else f"{w.get('worker')} NOT ANSWERING ({w['error']})")
            for w in workers if isinstance(w, dict)))
        if status.get("partial"):
            lines.append("counts above are of the workers that answered")
    return "\n".join(lines)


def live_call_rows(calls: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """The live calls as table rows: branches joined, the start as a time and an age."""
    rows = []
    for call in calls:
        started = call.get("started_at")
        at = float(started) if isinstance(started, int | float) else None
        rows.append({
            "call_id": call.get("call_id"), "user": call.get("user"), "queue": call.get("queue"),
            "method": call.get("method"), "state": call.get("state"),
            "branches": ",".join(str(b) for b in call.get("branches") or ()) or None,
            "started": time.strftime("%H:%M:%S", time.localtime(at)) if at is not None else started,
            "for": _duration(now - at) if at is not None else None,
            "answered_by": call.get("answered_by"),
        })
    return rows


def render_reload(result: dict[str, Any]) -> str:
    errors = [str(e) for e in result.get("errors") or ()]
    if result.get("reloaded"):
        users = result.get("users", "?")
        return f"reloaded: {users} user{'' if users == 1 else 's'}"
    head = f"not reloaded ({len(errors)} error(s)); the router keeps the last good policy"
    return "\n  ".join([head, *errors])


def render_unregister(result: dict[str, Any]) -> str:
    device, removed = result.get("device", "?"), result.get("removed")
    if isinstance(removed, list):           # the contacts themselves
        removed = len(removed)
    elif isinstance(removed, bool):
        removed = int(removed)
    if not removed:
        return f"{device}: was not registered; nothing removed"
    return f"{device}: {removed} registration(s) removed"
