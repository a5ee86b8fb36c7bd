"""The router process: wires config, stores and the SIP engine; signals; systemd notify.

SIGTERM/SIGINT ask the loop to stop (pending binding writes are flushed,
the module is unregistered, PJSIP is destroyed).  SIGHUP asks it to reload the
YAML: a file that fails validation is refused with its file:line errors and
the last good policy stays in force; registrations are untouched.  Signal
handlers only set flags; the PJSIP thread acts on them between polls.

Exit status: 0 stopped cleanly; 1 PJSIP could not start (port in use...);
2 invalid configuration (from the CLI); 3 this PJSIP build's layout differs;
4 the state database cannot be opened or written (``router.start.failed``
names the file and the reason).  A state database that fails *while* running
does not stop the router: writes are retried and calls keep being routed
(``GroupCommit`` in the engine).
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from types import FrameType

from router import log
from router.config import load_policy
from router.dns import ResolveError, resolve_trunk
from router.errors import ConfigError
from router.policy.model import Policy, Trunk
from router.runtime import PolicyState
from router.sip.core import SipCore
from router.sip.engine import Engine, EngineError
from router.sip.forward import Local
from router.sip.pjsip_module import LayoutMismatch
from router.store.interfaces import BindingStore, CallStore
from router.store.sqlite import (
    SqliteBindingStore,
    SqliteCallStore,
    SqlitePolicyStore,
    StateError,
    connect,
    describe,
)

EXIT_OK, EXIT_START_FAILED, EXIT_LAYOUT, EXIT_STATE = 0, 1, 3, 4
STATE_BUSY_TIMEOUT = 0.25    # the PJSIP thread waits at most this long for another writer's lock


@dataclass
class Flags:
    stop: bool = False
    reload: bool = False


def _notify(state: str) -> None:
    """sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
            sock.sendall(state.encode())
        except OSError:
            pass


class Router:
    def __init__(self, config_path: str, policy: Policy) -> None:
        self.config_path = config_path
        self.log = log.get("router")
        now = time.time()
        self.conn = connect(policy.database, durable=True, check_writable=True)
        try:
            self.policy_state = PolicyState(policy, SqlitePolicyStore(self.conn), now)
            self.bindings: BindingStore = SqliteBindingStore(self.conn)
            purged = self.bindings.purge_expired(now)
            loaded = self.bindings.load(now)
            # Start-up may wait for a CLI write; the PJSIP thread may not, once it runs.
            self.conn.execute(f"PRAGMA busy_timeout = {int(STATE_BUSY_TIMEOUT * 1000)}")
        except sqlite3.Error as exc:
            self.conn.close()
            raise StateError(policy.database, describe(exc)) from None
        self.state_read_failing = False
        first = policy.listen[0]
        self.resolved: dict[Trunk, tuple[str, int]] = {}
        self.core = SipCore(self.policy_state.view.policy, loaded, now,
                            local=Local(first.advertise or first.address, first.port),
                            resolve=self.resolve)
        # Writes are batched on the PJSIP thread itself: a writer thread was measured
        # to cost throughput (it competes for the GIL) without improving latency.
        calls: CallStore = SqliteCallStore(self.conn)
        self.engine = Engine(policy.listen, self.core, self.bindings, calls,
                             pj_log_level=policy.log.pjsip_level)
        if policy.trunk is not None:
            self.resolve(policy.trunk)           # look names up before the first call, not during it
        self.flags = Flags()
        self.log.info("router.state", database=policy.database, bindings=len(loaded),
                      expired_purged=purged)

    def resolve(self, trunk: Trunk) -> tuple[str, int]:
        """The trunk's address: looked up at start and on reload, never during a call."""
        found = self.resolved.get(trunk)
        if found is not None:
            return found
        try:
            found = resolve_trunk(trunk)
        except ResolveError as exc:
            self.log.error("trunk.resolve.failed", host=trunk.host, srv=trunk.srv, detail=str(exc))
            found = (trunk.host, trunk.port)
        else:
            self.log.info("trunk.resolved", host=trunk.host, srv=trunk.srv, address=found[0], port=found[1])
        self.resolved[trunk] = found
        return found

    def on_idle(self, now: float) -> None:
        if self.flags.reload:
            self.flags.reload = False
            self.reload(now)
        try:
            changed = self.policy_state.refresh()
        except sqlite3.Error as exc:       # run-time changes wait; routing goes on
            if not self.state_read_failing:
                self.log.error("state.read.failed", database=self.policy_state.yaml_policy.database,
                               error=describe(exc), detail="run-time changes are picked up when it works again")
            self.state_read_failing = True
            return
        if self.state_read_failing:
            self.log.warning("state.read.recovered")
            self.state_read_failing = False
        if changed:
            self.log.info("policy.runtime_change", marker=self.policy_state.view.marker)
            self.engine.execute(self.core.set_policy(self.policy_state.view.policy, now))

    def reload(self, now: float) -> None:
        try:
            policy = load_policy(self.config_path)
        except ConfigError as exc:
            self.log.error("policy.reload.refused", source=self.config_path,
                           errors=exc.problems, detail="keeping the last good policy")
            return
        if policy.listen != self.policy_state.yaml_policy.listen:
            self.log.warning("policy.reload.listen_ignored",
                             detail="listen addresses change only on restart")
        self.resolved.clear()
        if policy.trunk is not None:
            self.resolve(policy.trunk)
        try:
            view = self.policy_state.reload(policy, now)     # changes nothing if it fails
        except sqlite3.Error as exc:       # the YAML observations could not be written
            self.log.error("policy.reload.refused", source=self.config_path, errors=[],
                           detail=f"the state database failed ({describe(exc)}); keeping the last good policy")
            return
        self.engine.execute(self.core.set_policy(view.policy, now))
        self.engine.set_trunk(policy.trunk, self.resolve(policy.trunk) if policy.trunk else None)
        self.log.info("policy.reloaded", source=self.config_path, users=len(policy.users))

    def run(self) -> int:
        def on_stop(_signum: int, _frame: FrameType | None) -> None:
            self.flags.stop = True

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            self.flags.reload = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        try:
            self.engine.start()
        except EngineError as exc:
            self.log.error("router.start.failed", detail=str(exc))
            return EXIT_START_FAILED
        except LayoutMismatch as exc:
            self.log.error("router.layout.mismatch", detail=str(exc))
            return EXIT_LAYOUT
        # The policy and the loaded bindings live for the whole run: move them out
        # of the cyclic collector's sight so per-packet garbage collections stay cheap.
        gc.collect()
        gc.freeze()
        trunk = self.policy_state.yaml_policy.trunk
        self.engine.set_trunk(trunk, self.resolve(trunk) if trunk else None)
        self.log.info("router.started", pid=os.getpid())
        _notify("READY=1")
        code = EXIT_OK
        try:
            self.engine.run(lambda: self.flags.stop, self.on_idle)
        except LayoutMismatch as exc:
            self.log.error("router.layout.mismatch", detail=str(exc),
                           hint="this PJSIP build differs from pjsua2-python==2.15.1.post1")
            code = EXIT_LAYOUT
        finally:                      # also on an unexpected error: write what is pending first
            _notify("STOPPING=1")
            self.engine.close()
            self.conn.close()
        self.log.info("router.stopped", **self.engine.stats)
        return code


def run(config_path: str) -> int:
    policy = load_policy(config_path)
    log.configure(policy.log.level, policy.log.format)
    try:
        router = Router(config_path, policy)
    except StateError as exc:
        log.get("router").error("router.start.failed", database=exc.path, reason=exc.reason,
                                detail="the state database cannot be opened or written",
                                exit_status=EXIT_STATE)
        return EXIT_STATE
    return router.run()
