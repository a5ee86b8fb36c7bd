"""The control socket: one JSON request per connection, served from its own thread.

Protocol.  The client connects to the Unix stream socket, sends one line
``{"command": NAME, "args": {...}}`` and reads one line back:
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``; the
server then closes the connection.  The error is a sentence a person can act
on.  ``handlers`` maps each command name to a function of the args that
returns the result or raises ``ControlError``.

Who may connect.  The socket file is made owner-only (0600) before it gets its
real name: it is bound under a temporary name, chmod-ed, then renamed over
``control.sock`` (which also replaces a stale socket left by a crash, in one
step).  Each connection's peer credentials are checked as well: only this
process's user and root are served.  A socket that another live router still
answers on is left alone (logged), never stolen.

The thread serves one connection at a time with a read timeout, so a flood of
clients or a stuck one costs a queue in the kernel, never threads or work on
the PJSIP thread; handlers that need the SIP state ask the PJSIP thread
through ``OnLoop`` and wait for its answer a bounded time.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 2.0            # seconds a client may take to send its line
ACCEPT_POLL = 0.25            # seconds between looks at the stop flag
MAX_PATH = 107                # bytes in sun_path, without the terminating NUL

T = TypeVar("T")
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """A refusal the client shows as it is: the message says what to do."""


class OnLoop:
    """Runs a function on the PJSIP thread (the engine's inbox) and waits for its result.

    The PJSIP thread takes inbox jobs between polls (at most ``POLL_MS`` apart), so
    the wait is short unless the loop is stuck -- and then the client is told so
    after ``timeout`` seconds instead of hanging.  The job catches everything: an
    exception must reach the client, not stop the loop.
    """

    def __init__(self, inbox: queue.SimpleQueue[Callable[[], None]],
                 wake: Callable[[], None] = lambda: None) -> None:
        self.inbox = inbox
        self.wake = wake          # ends the loop's wait (a worker's loop waits up to 250 ms)
        self.waiting: set[threading.Event] = set()
        self.closed = False

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        done = threading.Event()
        box: dict[str, Any] = {}

        def job() -> None:
            try:
                box["result"] = fn()
            except Exception as exc:   # noqa: BLE001 -- handed to the waiting client
                box["error"] = exc
            done.set()

        if self.closed:
            raise ControlError("the router is stopping")
        self.waiting.add(done)
        try:
            self.inbox.put(job)
            self.wake()
            answered = done.wait(timeout)
        finally:
            self.waiting.discard(done)
        if "error" in box:
            raise box["error"]
        if "result" in box:
            return box["result"]  # type: ignore[no-any-return]
        if not answered:
            raise ControlError(f"the router's SIP loop did not answer within {timeout:g} s (it may be "
                               "stuck; see the journal); the request may still be carried out")
        raise ControlError("the router is stopping")

    def close(self) -> None:
        """The loop has ended: wake every waiter now instead of at its timeout."""
        self.closed = True
        for event in list(self.waiting):
            event.set()


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler],
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.path = path
        self.handlers = handlers
        self.log = log
        self.sock: socket.socket | None = None
        self.identity: tuple[int, int] | None = None       # (st_dev, st_ino) of the file we made
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.allowed_uids = {0, os.getuid()}

    # ------------------------------------------------------------------ life cycle
    def start(self) -> bool:
        """Bind and serve; False (logged with the path) when the socket cannot be made."""
        # Bound under a short temporary name in the same directory, then renamed: the
        # socket is owner-only before anyone can reach it under its real name.
        temporary = os.path.join(os.path.dirname(self.path) or ".", f".ctl{secrets.token_hex(3)}")
        longest = max(len(os.fsencode(self.path)), len(os.fsencode(temporary)))
        if longest > MAX_PATH:
            self.log.error("control.listen.failed", path=self.path,
                           detail=f"the path is {longest} bytes; a Unix socket path has at most {MAX_PATH}",
                           hint="set control.socket to a shorter path")
            return False
        if self._answered_by_another():
            self.log.error("control.listen.failed", path=self.path,
                           detail="another running router serves this socket (same state_dir?)")
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temporary)
            os.chmod(temporary, 0o600)
            os.rename(temporary, self.path)      # atomically replaces a stale socket
            sock.listen(16)
        except OSError as exc:
            sock.close()
            _unlink(temporary)
            self.log.error("control.listen.failed", path=self.path, detail=exc.strerror or str(exc))
            return False
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)
        sock.settimeout(ACCEPT_POLL)
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()
        self.log.info("control.listen", path=self.path)
        return True

    def close(self) -> None:
        """Stop the thread and remove the socket file, if it is still the one we made."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(READ_TIMEOUT + 2 * ACCEPT_POLL)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.identity is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self.identity and stat.S_ISSOCK(st.st_mode):
                    os.unlink(self.path)
            except OSError:
                pass
            self.identity = None

    def _answered_by_another(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            try:
                probe.connect(self.path)
            except OSError:
                return False                     # absent, or stale: nobody listens
            return True

    # ------------------------------------------------------------------ serving
    def _serve(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.stopping.is_set():
                    return
                self.log.error("control.accept.failed", path=self.path, detail=exc.strerror or str(exc))
                self.stopping.wait(ACCEPT_POLL)   # e.g. out of descriptors: do not spin
                continue
            with conn:
                try:
                    self._one(conn)
                except OSError as exc:            # the client went away: its loss
                    self.log.debug("control.client.error", path=self.path, detail=exc.strerror or str(exc))

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT)
        uid = _peer_uid(conn)
        if uid is not None and uid not in self.allowed_uids:
            self.log.warning("control.refused", path=self.path, uid=uid)
            _reply(conn, {"ok": False, "error": "only the router's own user and root may use this socket"})
            return
        try:
            line = _read_line(conn)
        except TimeoutError:
            _reply(conn, {"ok": False, "error": f"no request line within {READ_TIMEOUT:g} s"})
            return
        _reply(conn, self.answer(line))

    def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line (no socket here: the protocol alone)."""
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"the request is longer than {MAX_REQUEST // 1024} KiB"}
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "error": f"the request is not JSON ({exc}); send one line such as "
                                          '{"command": "status", "args": {}}'}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'the request must be an object with "command" (and optional "args")'}
        command, args = request["command"], request.get("args", {})
        handler = self.handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command[:40]!r}; the router knows: "
                                          + ", ".join(sorted(self.handlers))}
        if not isinstance(args, dict):
            return {"ok": False, "error": '"args" must be an object, e.g. {"device": "minh-desk"}'}
        try:
            return {"ok": True, "result": handler(args)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:   # noqa: BLE001 -- a bug answers the client and is logged, the router goes on
            self.log.exception("control.command.error", command=command)
            return {"ok": False, "error": f"{command} failed inside the router; the journal has the details"}


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0][:MAX_REQUEST + 1]


def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    conn.sendall(json.dumps(reply, default=str).encode() + b"\n")


def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[1])


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
