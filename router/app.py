"""The router process: wires config, stores, the SIP engine, the control socket and the metrics.

SIGTERM/SIGINT ask the loop to stop (pending binding writes are flushed,
the module is unregistered, PJSIP is destroyed).  SIGHUP asks it to reload the
YAML: a file that fails validation is refused with its file:line errors and
the last good policy stays in force; registrations are untouched.  Signal
handlers only set flags; the PJSIP thread acts on them between polls.

Reloads.  SIGHUP and ``sip-router reload`` (the control socket) take one path:
the YAML is read and validated and the trunk looked up on a thread of their
own -- a large file or a slow DNS server must not stall the SIP loop -- and
the PJSIP thread then adopts the new policy in one step.

The live view.  The control socket (``router.control``) and the metrics
endpoint (``router.metrics``) each run on a thread of their own and never make
the PJSIP thread wait.  Metrics come from counters the PJSIP thread bumps and
gauges it republishes once a second.  A control command that needs the SIP
state (status, calls, unregister, adopting a reload) is put on the engine's
inbox and answered by the PJSIP thread between two polls, at most ``POLL_MS``
later; the control thread waits for it at most ``CONTROL_TIMEOUT``.  A request
queue rather than a published snapshot: ``unregister`` and ``reload`` change
state only the PJSIP thread may touch, ``calls`` lists the calls of this very
moment, and one pass over the live calls when someone asks costs less than a
snapshot built every second whether anyone asks or not.

systemd (only when ``NOTIFY_SOCKET`` is set): ``READY=1`` once listening;
``WATCHDOG=1`` from the PJSIP loop itself every second when the unit has
``WatchdogSec`` (a stuck loop stops sending and is restarted); ``STATUS=`` with
registrations and calls every few seconds; ``RELOADING=1`` ... ``READY=1``
around a reload; ``STOPPING=1``.

Exit status: 0 stopped cleanly; 1 PJSIP could not start (port in use...);
2 invalid configuration (from the CLI); 3 this PJSIP build's layout differs;
4 the state database cannot be opened or written (``router.start.failed``
names the file and the reason).  A state database that fails *while* running
does not stop the router: writes are retried and calls keep being routed
(``GroupCommit`` in the engine).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from router import log
from router.config_child import load_policy_apart
from router.control import views
from router.control.server import ControlError, ControlServer, OnLoop
from router.control.systemd import Notifier
from router.dns import ResolveError, resolve_trunk
from router.errors import ConfigError
from router.gcpolicy import Collector, building_to_keep, paused_gc
from router.metrics import MetricsServer, Tally, registry_for
from router.policy import authz
from router.policy.model import DeviceKind, Policy, Trunk
from router.runtime import PolicyState, PreparedReload, prepare_view
from router.sip.core import SipCore
from router.sip.engine import Engine, EngineError
from router.sip.forward import Local
from router.sip.location import ownership_moves
from router.sip.pjsip_module import LayoutMismatch, release_free_memory
from router.sip.sharing import Channels, SharedPorts
from router.store.interfaces import BindingStore, CallStore
from router.store.sqlite import (
    SqliteBindingStore,
    SqliteCallStore,
    SqlitePolicyStore,
    StateError,
    connect,
    describe,
)
from router.workers import own_ports, steering, supervisor_gone, user_id_of, worker_socket

EXIT_OK, EXIT_START_FAILED, EXIT_LAYOUT, EXIT_STATE = 0, 1, 3, 4
# The PJSIP thread waits at most this long for another writer's lock (SQLite's busy handler
# sleeps meanwhile); a write that still finds it locked waits for the next flush instead
# (``GroupCommit``), so the loop never sleeps long behind a worker that holds the lock.
STATE_BUSY_TIMEOUT = 0.02
CONTROL_TIMEOUT = 5.0        # seconds a control command waits for the PJSIP thread
STATUS_INTERVAL = 5.0        # seconds between systemd STATUS= lines
LOGGED_CHANGES = 200         # run-time changes logged one by one per refresh; beyond, a count


@dataclass
class Flags:
    stop: bool = False
    reload: bool = False


@dataclass(frozen=True)
class Prepared:
    """A reload read and checked off the PJSIP thread: the policy, or why it was refused."""

    policy: Policy | None
    errors: list[str]
    resolved: dict[Trunk, tuple[str, int]]
    state: PreparedReload | None = None
    moves: dict[str, tuple[str, DeviceKind] | None] = field(default_factory=dict)
    detail: str = "keeping the last good policy"


class Router:
    def __init__(self, config_path: str, policy: Policy, channels: Channels | None = None) -> None:
        self.config_path = config_path
        self.log = log.get("router")
        self.worker = channels.index if channels is not None else None
        shared: SharedPorts | None = None
        if channels is not None:
            shared = SharedPorts(policy.listen, steering(policy, channels.count,
                                                         lambda user: user_id_of(self.core.policy, user)),
                                 channels)
        now = time.time()
        self.started_at = now
        self.conn = connect(policy.database, durable=True, check_writable=True)
        try:
            self.policy_state = PolicyState(policy, SqlitePolicyStore(self.conn), now)
            self.bindings: BindingStore = SqliteBindingStore(self.conn)
            purged = self.bindings.purge_expired(now)
            # With workers, the other workers' users are theirs.
            loaded = self.bindings.load(now, keep=shared.owns if shared is not None else None,
                                        names=policy_names(policy),
                                        share=(shared.index, shared.steering.workers) if shared is not None else None)
            # Start-up may wait for a CLI write; the PJSIP thread may not, once it runs.
            self.conn.execute(f"PRAGMA busy_timeout = {int(STATE_BUSY_TIMEOUT * 1000)}")
        except sqlite3.Error as exc:
            self.conn.close()
            raise StateError(policy.database, describe(exc)) from None
        self.state_read_failing = False
        self.logged_through = self.policy_state.view.marker    # run-time changes already logged
        first = policy.listen[0]
        self.resolved: dict[Trunk, tuple[str, int]] = {}
        local = Local(first.advertise or first.address, first.port)
        listen = policy.listen
        if shared is not None:
            ports = own_ports(policy, shared.index)
            local = Local(first.advertise or first.address, ports[0], shared.index,
                          tuple(x.port for x in policy.listen))
            listen = tuple(dataclasses.replace(x, port=p) for x, p in zip(policy.listen, ports, strict=True))
        self.core = SipCore(self.policy_state.view.policy, loaded, now, local=local, resolve=self.resolve,
                            secret=channels.secret if channels is not None else None)
        self.tally = Tally()
        self.tally.bindings_loaded(loaded)
        # The writes are committed on the writer thread, through a connection of its own: a
        # durable commit syncs the disk, and the PJSIP thread must not wait for that.
        self.write_conn = connect(policy.database, durable=True)
        self.write_conn.execute(f"PRAGMA busy_timeout = {int(STATE_BUSY_TIMEOUT * 1000)}")
        calls: CallStore = SqliteCallStore(self.write_conn)
        self.engine = Engine(listen, self.core, SqliteBindingStore(self.write_conn), calls,
                             pj_log_level=policy.log.pjsip_level, tally=self.tally, shared=shared,
                             write_thread=True)
        if policy.trunk is not None:
            self.resolve(policy.trunk)           # look names up before the first call, not during it
        self.flags = Flags()
        self.startup: dict[str, float] = {}
        self.collector = Collector(time.monotonic())
        self.notifier = Notifier()
        self.on_loop = OnLoop(self.engine.inbox, self.engine.wake)
        self.identity = views.identity(config_path, now)
        self.reload_lock = threading.Lock()
        self.next_status = 0.0
        self.log.info("router.state", database=policy.database, bindings=len(loaded),
                      expired_purged=purged)

    def resolve(self, trunk: Trunk) -> tuple[str, int]:
        """The trunk's address: looked up at start and on reload, never during a call."""
        found = self.resolved.get(trunk)
        if found is None:
            found = self.resolved[trunk] = self._look_up(trunk)
        return found

    def _look_up(self, trunk: Trunk) -> tuple[str, int]:
        try:
            found = resolve_trunk(trunk)
        except ResolveError as exc:
            self.log.error("trunk.resolve.failed", host=trunk.host, srv=trunk.srv, detail=str(exc))
            return trunk.host, trunk.port
        self.log.info("trunk.resolved", host=trunk.host, srv=trunk.srv, address=found[0], port=found[1])
        return found

    # ------------------------------------------------------------------ the PJSIP thread, once a second
    def on_idle(self, now: float) -> None:
        self.notifier.watchdog()          # first: whatever fails below, the loop itself is alive
        # A supervisor killed outright can no longer restart, reload or ask this worker,
        # which must not go on holding the ports as an orphan.
        if self.worker is not None and not self.flags.stop and supervisor_gone():
            self.log.error("router.supervisor.gone",
                           detail="the supervisor ended without stopping this worker: stopping")
            self.flags.stop = True
        self.publish(now)
        sweep = self.collector.tick(time.monotonic())
        if sweep is not None:
            self.log.info("gc.swept", seconds=round(sweep.seconds, 3), collected=sweep.collected,
                          tracked=sweep.tracked)
        if self.flags.reload:
            self.flags.reload = False
            threading.Thread(target=self._reload_on_signal, name="reload", daemon=True).start()
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
            self.core.adopt_runtime_changes(self.policy_state.view.policy)
            try:
                self._log_changes()
            except sqlite3.Error as exc:  # the changes are in force; only their log lines are missing
                self.log.warning("policy.runtime_change.unlogged", error=describe(exc),
                                 marker=self.policy_state.view.marker)

    def publish(self, now: float) -> None:
        """The gauges the metrics show, and systemd's status line every few seconds."""
        gauges = views.gauges(self.core, self.engine)
        self.tally.gauges = gauges
        self.tally.sweep(now)
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL
            kinds = self.tally.registrations_by_kind()
            self.notifier.send(f"STATUS={sum(kinds.values())} registrations "
                               f"({', '.join(f'{n} {k}' for k, n in kinds.items())}); "
                               f"{gauges.ringing} calls ringing, {gauges.answered} answered")

    def _log_changes(self) -> None:
        """One line per run-time change since the last refresh: who changed what, from what to what."""
        found = [c for c in self.policy_state.store.audit(limit=LOGGED_CHANGES) if c.id > self.logged_through]
        if len(found) == LOGGED_CHANGES and found[-1].id > self.logged_through + 1:
            self.log.warning("policy.runtime_change.unlogged", count=found[-1].id - self.logged_through - 1,
                             detail="more changes than are logged one by one; `sip-router audit` lists them")
        for change in reversed(found):
            self.log.info("policy.runtime_change", user=change.user_id, field=change.field,
                          old=_shown(change.field, change.old), new=_shown(change.field, change.new),
                          actor=change.actor, via=change.via, change_id=change.id)
            self.tally.runtime_changes[change.field] = self.tally.runtime_changes.get(change.field, 0) + 1
        if found:
            self.logged_through = found[0].id

    # ------------------------------------------------------------------ reloads
    def _reload_on_signal(self) -> None:
        try:
            self.reload_from_file()
        except ControlError as exc:       # the loop ended (stopping) or is stuck
            self.log.warning("policy.reload.abandoned", source=self.config_path, detail=str(exc))

    def reload_from_file(self) -> dict[str, Any]:
        """Read, validate and adopt the YAML (any thread but the PJSIP one); one at a time."""
        with self.reload_lock:
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                prepared = self.prepare_reload()
                answer = self.on_loop.call(lambda: self.adopt(prepared, time.time()), CONTROL_TIMEOUT)
                release_free_memory()          # what the replaced policy held
                return answer
            finally:
                self.notifier.send("READY=1")

    def prepare_reload(self) -> Prepared:
        """Everything a reload costs per user happens here, on the reload thread: parsing,
        recording the YAML's values (on a connection of its own), laying run-time changes
        over them, and finding the devices that changed owner.  The PJSIP thread only swaps."""
        with building_to_keep():
            return self._prepare_reload()

    def _prepare_reload(self) -> Prepared:
        try:
            policy = load_policy_apart(self.config_path)
        except ConfigError as exc:
            return Prepared(None, exc.problems, {})
        current = self.policy_state.yaml_policy            # reloads are one at a time
        try:
            conn = connect(current.database, durable=True)
            try:
                state = prepare_view(policy, SqlitePolicyStore(conn), time.time())
            finally:
                conn.close()
        except sqlite3.Error as exc:       # the YAML observations could not be written
            return Prepared(None, [], {}, detail=f"the state database failed ({describe(exc)}); "
                                                 "keeping the last good policy")
        resolved = {policy.trunk: self._look_up(policy.trunk)} if policy.trunk is not None else {}
        return Prepared(policy, [], resolved, state, ownership_moves(current, policy))

    def adopt(self, prepared: Prepared, now: float) -> dict[str, Any]:
        """The PJSIP thread takes a prepared reload in (or counts its refusal)."""
        began = time.perf_counter()
        current = self.policy_state.yaml_policy
        policy = prepared.policy
        if policy is None or prepared.state is None:
            return self._refused(prepared.errors, prepared.detail, current)
        if policy.listen != current.listen:
            self.log.warning("policy.reload.listen_ignored", detail="listen addresses change only on restart")
        if (policy.metrics, policy.control_socket) != (current.metrics, current.control_socket):
            self.log.warning("policy.reload.restart_needed",
                             detail="the metrics and control settings change only on restart")
        try:
            view = self.policy_state.adopt(prepared.state)     # changes nothing if it fails
        except sqlite3.Error as exc:       # the YAML observations could not be written
            return self._refused([], f"the state database failed ({describe(exc)}); keeping the last good policy",
                                 current)
        self.resolved = dict(prepared.resolved)
        self.engine.execute(self.core.set_policy(view.policy, now, prepared.moves))
        self.engine.set_trunk(policy.trunk, self.resolve(policy.trunk) if policy.trunk else None)
        self.log.info("policy.reloaded", source=self.config_path, users=len(policy.users),
                      moved_devices=len(prepared.moves),
                      sip_thread_ms=round((time.perf_counter() - began) * 1000, 1))
        self.tally.reloads["reloaded"] = self.tally.reloads.get("reloaded", 0) + 1
        return {"reloaded": True, "errors": [], "users": len(policy.users)}

    def _refused(self, errors: list[str], detail: str, current: Policy) -> dict[str, Any]:
        self.log.error("policy.reload.refused", source=self.config_path, errors=errors, detail=detail)
        self.tally.reloads["refused"] = self.tally.reloads.get("refused", 0) + 1
        return {"reloaded": False, "errors": errors or [detail], "users": len(current.users)}

    # ------------------------------------------------------------------ the control socket's commands
    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        def status(_args: dict[str, Any]) -> dict[str, Any]:
            return self.on_loop.call(lambda: views.status(
                self.identity, self.core, self.engine, self.tally, self.policy_state.view.marker, time.time()),
                CONTROL_TIMEOUT)

        def calls(_args: dict[str, Any]) -> dict[str, Any]:
            return self.on_loop.call(lambda: views.calls(self.core), CONTROL_TIMEOUT)

        def reload(_args: dict[str, Any]) -> dict[str, Any]:
            return self.reload_from_file()

        return {"status": status, "calls": calls, "unregister": self.unregister, "reload": reload}

    def unregister(self, args: dict[str, Any]) -> dict[str, Any]:
        device = args.get("device")
        if not isinstance(device, str) or not device:
            raise ControlError('unregister needs the device id: {"device": "minh-desk"}')
        if not views.device_exists(self.core.policy, device):      # a frozen policy: safe to read here
            raise ControlError(f"no device {device!r} in {self.identity.config}; "
                               "`sip-router registrations` lists the registered devices")

        def remove() -> dict[str, Any]:
            result = views.unregister(self.core, self.engine, device)
            self.log.info("registration.removed", device=device, removed=result["removed"], via="control")
            return result
        return self.on_loop.call(remove, CONTROL_TIMEOUT)

    # ------------------------------------------------------------------ life cycle
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
            self.log.error("router.start.failed", detail=str(exc), **exc.where)
            return EXIT_START_FAILED
        except LayoutMismatch as exc:
            self.log.error("router.layout.mismatch", detail=str(exc))
            return EXIT_LAYOUT
        # The policy and the loaded bindings live for the whole run: move them out
        # of the cyclic collector's sight so per-packet garbage collections stay cheap.
        self.collector.start()
        release_free_memory()
        policy = self.policy_state.yaml_policy
        if self.worker in (None, 0):       # one trunk registration for the whole router
            self.engine.set_trunk(policy.trunk, self.resolve(policy.trunk) if policy.trunk else None)
        control = ControlServer(worker_socket(policy.control_socket, self.worker), self.handlers(),
                                log.get("control"))
        control.start()                   # without it the router still routes: the failure is logged
        metrics: MetricsServer | None = None
        if policy.metrics.enabled:
            metrics = MetricsServer(registry_for(self.tally, self.engine.stats, self.started_at),
                                    policy.metrics.address, policy.metrics.port + (self.worker or 0),
                                    log.get("metrics"))
            metrics.start()
        self.log.info("router.started", pid=os.getpid(), users=len(policy.users), **self.startup)
        self.notifier.send("READY=1")
        code = EXIT_OK
        try:
            self.engine.run(lambda: self.flags.stop, self.on_idle)
        except LayoutMismatch as exc:
            self.log.error("router.layout.mismatch", detail=str(exc),
                           hint="this PJSIP build differs from pjsua2-python==2.15.1.post1")
            code = EXIT_LAYOUT
        finally:                      # also on an unexpected error: write what is pending first
            self.notifier.send("STOPPING=1")
            self.on_loop.close()
            control.close()
            if metrics is not None:
                metrics.close()
            self.engine.close()
            self.write_conn.close()
            self.conn.close()
            self.notifier.close()
        self.log.info("router.stopped", **self.engine.stats, loop_busy=self.engine.tally.loop.summary(),
                      message_delay=self.engine.tally.delay.summary())
        return code


def policy_names(policy: Policy) -> dict[str, str]:
    """The policy's user and device id strings, for loaded bindings to share."""
    names = {u.id: u.id for u in policy.users}
    names.update((d.id, d.id) for u in policy.users for d in u.devices)
    return names


def _shown(field: str, value: str | None) -> str | None:
    """A value as logs may show it: a password hash only as "(set)"."""
    if field in authz.HIDDEN and value is not None:
        return "(set)"
    return value


def run(config_path: str, policy: Policy, channels: Channels | None, began: float) -> int:
    """Run one router process (alone, or worker ``channels.index``) on ``policy``, parsed
    from ``config_path`` since ``began``; ``router.launch`` decides which process this is."""
    log.configure(policy.log.level, policy.log.format)
    if channels is not None:
        log.bind(worker=channels.index)
    loaded = time.monotonic()
    try:
        with paused_gc():                 # start-up builds long-lived objects only: no cycles to find
            router = Router(config_path, policy, channels)
        router.startup = {"config_seconds": round(loaded - began, 2),
                          "state_seconds": round(time.monotonic() - loaded, 2)}
    except StateError as exc:
        log.get("router").error("router.start.failed", database=exc.path, reason=exc.reason,
                                detail="the state database cannot be opened or written",
                                exit_status=EXIT_STATE)
        return EXIT_STATE
    return router.run()
