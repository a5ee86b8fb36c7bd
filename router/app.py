"""The router process: wires config, stores and the SIP engine; signals; systemd notify.

SIGTERM/SIGINT ask the loop to stop (pending binding writes are flushed,
the module is unregistered, PJSIP is destroyed).  SIGHUP asks it to reload the
YAML: a file that fails validation is refused with its file:line errors and
the last good policy stays in force; registrations are untouched.  Signal
handlers only set flags; the PJSIP thread acts on them between polls.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
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
from router.sip.pjsip_module import LayoutMismatch
from router.sip.forward import Local
from router.store.sqlite import SqliteBindingStore, SqliteCallStore, SqlitePolicyStore, connect

EXIT_OK, EXIT_START_FAILED, EXIT_LAYOUT = 0, 1, 3


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
        self.conn = connect(policy.database)
        self.policy_state = PolicyState(policy, SqlitePolicyStore(self.conn), now)
        self.bindings = SqliteBindingStore(self.conn)
        purged = self.bindings.purge_expired(now)
        loaded = self.bindings.load(now)
        first = policy.listen[0]
        self.resolved: dict[Trunk, tuple[str, int]] = {}
        self.core = SipCore(self.policy_state.view.policy, loaded, now,
                            local=Local(first.advertise or first.address, first.port),
                            resolve=self.resolve)
        # Writes are batched on the PJSIP thread itself: a writer thread was measured
        # to cost throughput (it competes for the GIL) without improving latency.
        self.engine = Engine(policy.listen, self.core, self.bindings, SqliteCallStore(self.conn),
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
        if self.policy_state.refresh():
            self.log.info("policy.runtime_change", marker=self.policy_state.view.marker)
            self.engine.execute(self.core.set_policy(self.policy_state.view.policy))

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
        view = self.policy_state.reload(policy, now)
        self.engine.execute(self.core.set_policy(view.policy))
        self.engine.set_trunk(policy.trunk, self.resolve(policy.trunk) if policy.trunk else None)
        self.log.info("policy.reloaded", source=self.config_path, users=len(policy.users))

    def run(self) -> int:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.flags.stop = True

        def on_hup(signum: int, frame: FrameType | None) -> None:
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
        _notify("STOPPING=1")
        self.engine.close()
        self.conn.close()
        self.log.info("router.stopped", **self.engine.stats)
        return code


def run(config_path: str) -> int:
    policy = load_policy(config_path)
    log.configure(policy.log.level, policy.log.format)
    return Router(config_path, policy).run()
