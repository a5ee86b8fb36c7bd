"""The PJSIP thread: owns the pjsua2 endpoint, polls it, executes the core's commands.

Theory of operation.  Exactly one thread -- the one that calls ``run`` --
touches PJSIP.  ``threadCnt = 0`` makes pjsua start no worker threads, so the
router module's callback runs inside ``libHandleEvents`` on this thread.  The
callback only copies the packet out of PJSIP and returns.  The loop drains
PJSIP (up to ``BATCH`` packets), then hands each packet to
``SipCore.on_request`` and executes the commands it returns: sends go out
together once the pass's datagrams are handled (a receiver that several of
them reach is woken once, not once each), before the timers, the commit and
the idle duties run; binding writes are batched and handed every
``FLUSH_INTERVAL`` to the writer thread (``router.sip.writer``), which
commits them in one SQLite transaction while the loop goes on
(``GroupCommit``: acknowledged means stored, so the 200 to a REGISTER waits
for the commit of its binding, about 50 ms at most, and leaves from the pass
that finds the commit done).
Running the Python core over a batch, instead of once inside each callback,
keeps the interpreter's caches warm: measured, it
raised the registrations a second with digest from about 2,000 to about 3,800.
Under load a pass also waits until a few milliseconds have passed since the
previous one began, so that it finds more than one or two datagrams
(``router.sip.pacing``).
Other threads never call pjsua2: they put callables on ``self.inbox`` and the
loop runs them between polls (the control socket's commands come this way).
Every message and command is also counted in ``self.tally`` -- plain ints, no
lock -- which the metrics thread reads when scraped (``router.metrics``).
Over UDP the loop waits in ``select`` instead of inside PJSIP -- on PJSIP's
own sockets and, with several workers (``router.sip.sharing``), the shared
UDP sockets and the hand-over channel -- and reads the datagrams itself: a
recvfrom costs a fraction of PJSIP's poll, parse and callback.  Only when
the router registers to a trunk does PJSIP read its own sockets (the
registrar's answers belong to PJSIP's transactions), with
``libHandleEvents(0)``; the router module's callback then delivers the rest.
Signal handlers only set flags; the loop looks at them.  Every SWIG object
(endpoint, log writer, transports) is owned here and released in ``close`` in
reverse order.
"""

from __future__ import annotations

import math
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pjsua2 as pj

from router import log
from router.errors import MalformedMessage, RouterError
from router.metrics import Tally
from router.policy.model import Listen, Trunk
from router.sip.commands import Command, Log, SaveBindings, SaveCall, Send, Source
from router.sip.commit import FLUSH_INTERVAL, GroupCommit
from router.sip.core import SipCore
from router.sip.message import parse
from router.sip.pacing import Pacing
from router.sip.pjsip_module import LayoutMismatch, Packet, RouterModule, quiet_until_configured
from router.sip.sharing import SharedPorts, SharingError, earliest, read_datagrams, stamp_arrivals
from router.sip.transaction import transaction_key
from router.sip.writer import WriterThread
from router.store.interfaces import BindingWriter, CallWriter

POLL_MS = 10
# Over UDP only (and with shared ports) the loop waits in select(), which wakes for a
# datagram, a signal (set_wakeup_fd) or an inbox job (``wake``): the cap only bounds the
# wait for PJSIP's own timers (the trunk registration), so an idle router wakes 4 times
# a second, not 100.  A TCP listener's connections live inside PJSIP, which must then be
# polled every ``POLL_MS``.
SELECT_POLL_MS = 250
BATCH = 256
# The loop is behind (overload) when a pass reads a full batch whose oldest datagram waited
# ``MAX_QUEUE_WAIT`` in the socket (the kernel stamps each arrival), until a pass finds less
# than a batch waiting.  Once SIPp's or a phone's retransmissions (T1, 0.5 s) join the queue
# the load only grows: without shedding, throughput collapsed to a fifth above saturation.
# A full batch alone is not overload: a commit, a GC pass, or, with workers sharing the cores
# with other busy processes, a few tens of milliseconds without the CPU leave one, and the
# loop works it off.  0.2 s of waiting is well before T1.  Where no arrival time is known
# (PJSIP reads the sockets: TCP, or a trunk registration) full batches for ``BEHIND_FOR``
# count instead.
MAX_QUEUE_WAIT = 0.2
BEHIND_FOR = 0.2
KNOWN_ADDRESSES = 100_000    # remembered as checked; past that, each send checks its host again
IDLE_INTERVAL = 1.0          # reload flag and run-time policy changes
_PJ_LEVELS = {0: "critical", 1: "error", 2: "warning", 3: "info", 4: "debug", 5: "debug", 6: "debug"}


SOCKET_BUFFER = 4 * 1024 * 1024
SOL_SOCKET, SO_SNDBUF, SO_RCVBUF = 1, 7, 8


def _socket_buffers() -> Any:
    """Large socket buffers: a registration storm arrives faster than one poll
    drains it, and a datagram the kernel drops costs the phone a 500 ms
    retransmission.  The kernel caps the value at net.core.rmem_max."""
    params = pj.SockOptParams()
    options = pj.SockOptVector()
    for name in (SO_RCVBUF, SO_SNDBUF):
        option = pj.SockOpt()
        option.level = SOL_SOCKET
        option.optName = name
        option.setOptValInt(SOCKET_BUFFER)
        options.append(option)
    params.sockOpts = options
    return params


def _find_udp_socket(address: str, port: int) -> socket.socket | None:
    """A duplicate of the UDP socket PJSIP bound to ``address:port``, found by
    asking each open descriptor what it is (no struct offsets needed)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            sock = socket.fromfd(fd, family, socket.SOCK_DGRAM)
        except OSError:
            continue
        try:
            if (sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM
                    and sock.getsockname()[:2] == (address, port)):
                return sock
        except OSError:
            pass
        sock.close()
    return None


class PjLogWriter(pj.LogWriter):  # type: ignore[misc]
    """Routes PJSIP's own log lines into structlog (no buffered C stdio)."""

    def __init__(self) -> None:
        super().__init__()
        self.log = log.get("pjsip")

    def write(self, entry: Any) -> None:
        level = _PJ_LEVELS.get(entry.level, "debug")
        getattr(self.log, level if level != "critical" else "error")("pjsip", line=entry.msg.rstrip())


class TrunkAccount(pj.Account):  # type: ignore[misc]
    """The router's registration to the PSTN trunk (a pjsua2 Account: what it is for).

    ``registered`` and ``detail`` are what ``sip-router status`` and the trunk gauge
    show: None until the trunk first answers."""

    def __init__(self, registrar: str) -> None:
        super().__init__()
        self.log = log.get("trunk")
        self.registrar = registrar
        self.registered: bool | None = None
        self.detail = f"registering at {registrar}"

    def onRegState(self, prm: Any) -> None:
        ok = prm.code // 100 == 2
        self.registered = ok and prm.expiration > 0
        self.detail = f"{prm.code} {prm.reason} from {self.registrar}" + (
            f", expires in {prm.expiration} s" if self.registered else "")
        getattr(self.log, "info" if ok else "warning")("trunk.registration", code=prm.code, reason=prm.reason,
                                                       expires=prm.expiration, registrar=self.registrar)


def trunk_account_config(trunk: Trunk, address: tuple[str, int]) -> Any:
    cfg = pj.AccountConfig()
    suffix = ";transport=tcp" if trunk.transport == "tcp" else ""
    cfg.idUri = f"sip:{trunk.username}@{trunk.host}"
    cfg.regConfig.registrarUri = f"sip:{address[0]}:{address[1]}{suffix}"
    cfg.regConfig.timeoutSec = 300
    cfg.regConfig.retryIntervalSec = 30
    cfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", trunk.realm or "*", trunk.username or "",
                                                   0, trunk.password or ""))
    return cfg


class EngineError(RouterError):
    """PJSIP refused to start (port in use, bad address...); ``where`` names the
    listener that failed, for the log line."""

    def __init__(self, detail: str, where: dict[str, object] | None = None) -> None:
        super().__init__(detail)
        self.where = where or {}


class Engine:
    def __init__(self, listen: tuple[Listen, ...], core: SipCore, store: BindingWriter,
                 calls: CallWriter, pj_log_level: int = 2, tally: Tally | None = None,
                 shared: SharedPorts | None = None, write_thread: bool = False) -> None:
        self.listen = listen
        self.shared = shared
        self.pj_sockets: list[socket.socket] = []     # PJSIP's UDP sockets, to wait on in select()
        self.selecting = False         # the loop waits in select(): UDP only, see SELECT_POLL_MS
        self.waker = socket.socketpair()
        for end in self.waker:
            end.setblocking(False)
        self.pj_poll_at = 0.0          # when selecting: when PJSIP's timers next get a poll
        self.core = core
        self.tally = tally if tally is not None else Tally()     # counted here, scraped elsewhere
        self.log = log.get("sip")
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.held_by_device: dict[str, set[int]] = {}
        # ``write_thread``: the stores are the writer thread's own (their own connection)
        self.writes: WriterThread | None = WriterThread(store, calls, self.wake, time.time) if write_thread else None
        self.commit = GroupCommit(store, calls, self._dispatch, log.get("state"), self._refused,
                                  writer=self.writes)
        self.stop_requested = False
        self.failure: str | None = None
        self.ep = pj.Endpoint()
        self.writer = PjLogWriter()
        self.transports: list[int] = []
        self.module: RouterModule | None = None
        self.account: TrunkAccount | None = None
        self.trunk: Trunk | None = None
        self.pj_log_level = pj_log_level
        self.stats = {"requests": 0, "responses": 0, "sent": 0, "send_errors": 0, "shed": 0}
        self.behind_since: float | None = None   # when the passes that read a full batch began
        self.oldest_arrival: float | None = None  # wall-clock arrival of the oldest datagram of this pass
        self.shed_from = 0             # the shed count when the current overload began
        if shared is not None:            # one set of counters: status and the metrics see the hand-overs
            self.stats.update(shared.stats)
            shared.stats = self.stats
        self.received: list[tuple[bool, Packet]] = []
        self.outgoing: list[Send] = []             # this pass's sends, out together (``_send_out``)
        self.pacing = Pacing()
        self.udp: dict[int, socket.socket] = {}    # address family -> PJSIP's own UDP socket
        # With several workers, ``udp`` is the shared ports' sockets and this the worker's own
        # port, which its Via names: what ``Send.own_port`` requests leave from.
        self.own_udp: dict[int, socket.socket] = {}
        self.addresses: set[str] = set()           # hosts already checked to be addresses

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        try:
            self._start()
        except pj.Error as exc:
            raise EngineError(exc.info()) from None

    def _start(self) -> None:
        quiet_until_configured()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = 1                 # calls are proxied, never pjsua calls
        cfg.uaConfig.userAgent = "sip-router"
        cfg.logConfig.writer = self.writer
        cfg.logConfig.level = self.pj_log_level
        cfg.logConfig.consoleLevel = self.pj_log_level
        cfg.logConfig.decor = 0
        # No media ever flows through the router (it routes SIP messages only): no media
        # worker thread, no ioqueue of its own and no sound device, so no clock either.
        # Their threads woke 150 times a second each, on cores the loop needs.
        cfg.medConfig.noVad = True
        cfg.medConfig.threadCnt = 0
        cfg.medConfig.hasIoqueue = False
        self.ep.libInit(cfg)
        self.ep.audDevManager().setNoDev()
        for item in self.listen:
            tc = pj.TransportConfig()
            tc.port = item.port
            tc.boundAddress = item.address
            tc.sockOptParams = _socket_buffers()
            kind = pj.PJSIP_TRANSPORT_TCP if item.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
            if ":" in item.address:
                kind = pj.PJSIP_TRANSPORT_TCP6 if item.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP6
            try:
                self.transports.append(self.ep.transportCreate(kind, tc))
            except pj.Error as exc:       # the one error an operator meets most: name the address
                raise EngineError(exc.info(), {"address": item.address, "port": item.port,
                                               "transport": item.transport}) from None
            if item.transport == "udp":
                sock = _find_udp_socket(item.address, item.port)
                if sock is not None:
                    sock.setblocking(False)      # PJSIP's ioqueue made it so already; say it here too
                    stamp_arrivals(sock)         # PJSIP's own reads ignore the stamps
                    self.pj_sockets.append(sock)
                    if self.shared is None:
                        self.udp.setdefault(sock.family, sock)
                    else:
                        self.own_udp.setdefault(sock.family, sock)
            if item.transport == "tcp":
                self.log.warning("sip.tcp.enabled", address=item.address, port=item.port,
                                 detail="TCP is safe only from trusted addresses (an edge proxy): "
                                        "a connection storm can abort PJSIP")
            self.log.info("sip.listen", address=item.address, port=item.port, transport=item.transport)
        if self.shared is not None:
            try:
                self.shared.bind()
            except SharingError as exc:
                raise EngineError(str(exc)) from None
            self.udp = self.shared.senders()
            if self.shared.spread_failure:
                self.log.warning("sip.workers.spread_failed", detail=self.shared.spread_failure,
                                 hint="datagrams go to workers by the sender's address instead")
            self.log.info("sip.workers.shared", worker=self.shared.index, workers=self.shared.channels.count,
                          ports=[x.port for x in self.shared.listen])
        self.selecting = all(item.transport == "udp" for item in self.listen) and \
            len(self.pj_sockets) == len(self.listen)
        self.ep.libStart()
        self.module = RouterModule(self._on_packet, self._on_response)
        self.module.register()
        if self.writes is not None:
            self.writes.start()

    def set_trunk(self, trunk: Trunk | None, address: tuple[str, int] | None = None) -> None:
        """Register to the trunk when it has credentials (again after a reload changed them)."""
        wanted = trunk if trunk is not None and trunk.username and trunk.password else None
        if wanted == self.trunk:
            return
        if self.account is not None:
            self.account.shutdown()
            self.account = None
        self.trunk = wanted
        if wanted is None:
            return
        host, port = address or (wanted.host, wanted.port)
        account = TrunkAccount(f"{host}:{port}")
        try:
            account.create(trunk_account_config(wanted, (host, port)))
        except pj.Error as exc:
            self.log.error("trunk.registration.failed", address=host, port=port, transport=wanted.transport,
                           detail=exc.info())
            return
        self.account = account

    def trunk_state(self) -> tuple[bool | None, str]:
        """Registered to the trunk?  None with why when there is no answer to give."""
        if self.account is None:
            return None, "no trunk registration configured" if self.trunk is None else "registration failed"
        return self.account.registered, self.account.detail

    def close(self) -> None:
        if self.writes is not None:
            self.writes.stop()           # the batch being written, then the last flush inline
        self.commit.flush(time.time(), force=True)
        self._send_out()
        if self.commit.pending or self.commit.pending_calls:
            self.commit.log.error("state.write.lost", bindings=len(self.commit.pending),
                                  calls=len(self.commit.pending_calls),
                                  detail="the state database failed until shutdown")
        self.stats.update(self.commit.stats)
        if self.account is not None:
            self.account.shutdown()
            self.account = None
        self.own_udp.clear()
        for sock in (*self.udp.values(), *self.pj_sockets):
            sock.close()
        self.udp.clear()
        self.pj_sockets.clear()
        if self.shared is not None:
            self.shared.close()
        for end in self.waker:
            end.close()
        if self.module is not None:
            self.module.unregister()
            self.module = None
        try:
            self.ep.libDestroy()
        except pj.Error as exc:
            self.log.warning("sip.shutdown.error", detail=exc.info())

    # ------------------------------------------------------------------ the loop
    def run(self, should_stop: Callable[[], bool], on_idle: Callable[[float], None]) -> None:
        """Poll until ``should_stop()``; ``on_idle(now)`` runs between polls."""
        # A signal (SIGTERM, SIGHUP) must end a worker's select() wait, not only set its flag.
        waker = self.waker if threading.current_thread() is threading.main_thread() and self.selecting else None
        previous = signal.set_wakeup_fd(waker[1].fileno(), warn_on_full_buffer=False) if waker is not None else -1
        try:
            self._run(should_stop, on_idle)
        finally:
            if waker is not None:
                signal.set_wakeup_fd(previous)

    def _run(self, should_stop: Callable[[], bool], on_idle: Callable[[float], None]) -> None:
        next_flush = next_idle = 0.0
        while not should_stop() and self.failure is None:
            pause = self.pacing.pause(time.monotonic())
            if pause:                         # under load: let this pass gather (``router.sip.pacing``)
                time.sleep(pause)
            wake = self.core.next_timer()
            if self.commit.held:              # answers wait for the flush: do not oversleep it
                wake = min(wake, next_flush)
            if self.selecting:                # select() waits long: wake for the loop's own duties too
                wake = min(wake, next_idle)
                if self.commit.pending:
                    wake = min(wake, next_flush)
            # Rounded up: rounded down, the last millisecond before every timer was a busy spin.
            cap = SELECT_POLL_MS if self.selecting else POLL_MS
            wait = max(0, min(cap, math.ceil((wake - time.time()) * 1000))) if not self.received else 0
            if self.selecting:
                self._poll_select(wait)
            elif self.ep.libHandleEvents(wait) > 0:
                while len(self.received) < BATCH and self.ep.libHandleEvents(0) > 0:
                    pass
            busy_from = time.monotonic()      # the wait is over: from here on, messages queue up
            batch, self.received = self.received, []
            self.pacing.passed(len(batch), busy_from)
            arrived, self.oldest_arrival = self.oldest_arrival, None
            self._track_backlog(len(batch), busy_from, None if arrived is None else time.time() - arrived)
            for is_response, packet in batch:
                self._handle(packet, is_response)
            if self.outgoing:                 # the answers first: not behind timers, a commit or a reload
                self._send_out()
            if arrived is not None and batch:  # the oldest datagram's time in the router, sends included
                self.tally.delay.observe(max(0.0, time.time() - arrived))
            if self.writes is not None and self.writes.finished:
                self.writes.collect(time.time())     # a batch was written: its held answers leave
            if self.core.next_timer() <= time.time():
                self._guarded(self.core.handle_timer, time.time())
            while True:
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    break
                job()
            now = time.time()
            if now >= next_flush:
                self.flush()
                next_flush = now + FLUSH_INTERVAL
            if now >= next_idle:
                next_idle = now + IDLE_INTERVAL
                try:
                    on_idle(now)
                except Exception:   # noqa: BLE001 -- a reload or policy refresh must not stop the router
                    self.stats["idle_errors"] = self.stats.get("idle_errors", 0) + 1
                    self.log.exception("router.idle.error")
            if self.outgoing:
                self._send_out()
            done = time.monotonic()
            if self.selecting and done >= self.pj_poll_at:
                self._poll_pjsip(done)        # what it reads is handled by the next pass, at once
                done = time.monotonic()
            if self.module is not None and self.module.errors:
                self.failure = self.module.errors[0]
            self.tally.loop.observe(done - busy_from)
        if self.failure is not None:
            raise LayoutMismatch(self.failure)

    def _track_backlog(self, taken: int, now: float, waited: float | None = None) -> None:
        """A pass that reads a full batch left datagrams waiting; when its oldest datagram had
        waited ``MAX_QUEUE_WAIT`` (``waited``, seconds; None when unknown: full passes for
        ``BEHIND_FOR`` instead), they arrive faster than the router works them off.  New calls
        are then refused with 503 (``SipCore.overloaded``) until a pass finds less than a batch
        waiting.  ``now``: when this pass began (monotonic)."""
        if taken < BATCH:
            self.behind_since = None
            behind = False
        else:
            if self.behind_since is None:
                self.behind_since = now
            if waited is not None:
                behind = self.core.overloaded or waited >= MAX_QUEUE_WAIT
            else:
                behind = now - self.behind_since >= BEHIND_FOR
        if behind == self.core.overloaded:
            return
        self.core.overloaded = behind
        if behind:
            self.shed_from = self.stats["shed"]
            self.log.warning("sip.overload.started", detail="datagrams arrive faster than the router answers "
                             "them: new calls get 503 with Retry-After until it catches up")
        else:
            self.log.warning("sip.overload.ended", calls_refused=self.stats["shed"] - self.shed_from)

    def wake(self) -> None:
        """From another thread: a job is on the inbox; end the loop's wait now."""
        try:
            self.waker[1].send(b"\0")
        except OSError:
            pass           # already a byte waiting, or closing: the loop wakes anyway

    def _poll_select(self, wait_ms: int) -> None:
        """Wait for any of the router's sockets and read the UDP ones here, without PJSIP:
        the shared ports, and PJSIP's own UDP sockets too unless the router registers to a
        trunk (the registrar's answers arrive there and belong to PJSIP's transactions).  PJSIP
        gets a zero-wait poll here when it must read its own port; its timers get one every
        ``POLL_MS`` after the pass's answers have left (``_poll_pjsip``), not before them."""
        shared = self.shared
        waited_from = time.time()
        try:
            ready = select.select([*(shared.readable() if shared is not None else ()), *self.pj_sockets,
                                   self.waker[0]], [], [], wait_ms / 1000)[0]
        except InterruptedError:
            ready = []
        if self.waker[0] in ready:
            try:
                while self.waker[0].recv(256):
                    pass
            except OSError:
                pass
        if ready and shared is not None:
            self._arrived(shared.drain(ready, self.received, BATCH, waited_from))
        pj_ready = False
        if ready:
            own = self.account is None
            for sock in self.pj_sockets:
                if sock in ready:
                    if own:
                        self._arrived(read_datagrams(sock, self.received, BATCH, waited_from))
                    else:
                        pj_ready = True
        if pj_ready:
            self._poll_pjsip(time.monotonic())

    def _poll_pjsip(self, now: float) -> None:
        # Without a trunk registration PJSIP runs no transaction of its own: its timers
        # need no poll every ``POLL_MS`` (a poll costs tens of microseconds on a busy loop).
        self.pj_poll_at = now + (POLL_MS if self.account is not None else SELECT_POLL_MS) / 1000
        while self.ep.libHandleEvents(0) > 0 and len(self.received) < BATCH:
            pass

    def _arrived(self, arrived: float | None) -> None:
        self.oldest_arrival = earliest(self.oldest_arrival, arrived)

    def _guarded(self, step: Callable[[float], list[Command]], now: float) -> None:
        try:
            commands = step(now)
        except Exception:   # noqa: BLE001 -- a bug in one timer must not stop the router
            self.stats["core_errors"] = self.stats.get("core_errors", 0) + 1
            self.log.exception("sip.core.error", during="timers")
            return
        self.execute(commands, acknowledges=False)     # timers acknowledge nothing to anyone

    def _on_packet(self, packet: Packet) -> None:
        self.received.append((False, packet))

    def _on_response(self, packet: Packet) -> None:
        self.received.append((True, packet))

    def _handle(self, packet: Packet, is_response: bool) -> None:
        source = Source(packet.host, packet.port, packet.transport, packet.conn)
        handler = self.core.on_response if is_response else self.core.on_request
        self.stats["responses" if is_response else "requests"] += 1
        self.tally.received(packet.data)
        try:
            commands = handler(packet.data, source, time.time())
        except Exception:   # noqa: BLE001 -- one bad message must not stop the router
            self.stats["core_errors"] = self.stats.get("core_errors", 0) + 1
            self.log.exception("sip.core.error", source=f"{packet.host}:{packet.port}",
                               first_line=packet.data.split(b"\r\n", 1)[0][:120].decode(errors="replace"))
            return
        self.execute(commands)

    def execute(self, commands: list[Command], acknowledges: bool = True) -> None:
        """Run the core's commands.  When the list stores bindings and answers a request
        (``acknowledges``), its sends -- the 200 to the REGISTER -- wait for the
        commit (``GroupCommit``)."""
        hold = acknowledges and any(type(command) is SaveBindings for command in commands)
        for command in commands:
            if type(command) is Send:
                if hold:
                    self.commit.hold(command)
                elif not self.commit.is_held(command):   # else: a retransmission, answered at commit
                    self._dispatch(command)
            elif type(command) is SaveBindings:
                self.commit.save(command)
                self._hold_connections(command)
                self.tally.bindings_saved(command)
            elif type(command) is SaveCall:
                self.commit.save_call(command.record)
                self.tally.call_saved(command.record)
            elif type(command) is Log:
                if command.event == "call.shed":
                    self.stats["shed"] += 1
                self.tally.event(command)
                if log.enabled(command.level):       # a filtered line costs no dict of its fields
                    getattr(self.log, command.level)(command.event, **dict(command.fields))

    def _dispatch(self, command: Send) -> None:
        self.outgoing.append(command)

    def _send_out(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        for command in outgoing:
            status = self._send(command)
            if status == 0:
                self.stats["sent"] += 1
                self.tally.sent(command.data)
            else:
                self.stats["send_errors"] += 1
                if status > 0 and self.module is not None:
                    self.log.warning("sip.send.failed", host=command.host, port=command.port,
                                     transport=command.transport, detail=self.module.strerror(status))

    def _refused(self, answer: Send, refusal: Send) -> None:
        """A held 200 became a 500: the core's transaction cache must answer a
        retransmission of that REGISTER with the 500, not the 200."""
        try:
            key = transaction_key(parse(answer.data))
        except (MalformedMessage, ValueError, IndexError):
            return
        self.core.cache.put(key, refusal.data, time.time())

    def _send(self, command: Send) -> int:
        """UDP goes straight out of PJSIP's own UDP socket (same source address and
        port, no tdata allocation) -- with several workers, out of the shared port, or
        the worker's own for ``own_port``; TCP and anything unusual go through PJSIP."""
        family = socket.AF_INET6 if ":" in command.host else socket.AF_INET
        if command.host not in self.addresses:
            try:
                socket.inet_pton(family, command.host)
            except OSError:      # a name that did not resolve: never look names up on this thread
                self.log.warning("sip.send.unresolved", host=command.host, port=command.port)
                return -1
            if len(self.addresses) < KNOWN_ADDRESSES:
                self.addresses.add(command.host)
        if command.transport == "udp":
            sock = (command.own_port and self.own_udp.get(family)) or self.udp.get(family)
            if sock is not None:
                try:
                    sock.sendto(command.data, (command.host, command.port))
                    return 0
                except OSError as exc:
                    self.log.debug("sip.send.direct_failed", host=command.host, port=command.port,
                                   detail=str(exc))
        assert self.module is not None
        return self.module.send(command.data, command.host, command.port,
                                command.transport, command.conn)

    def _hold_connections(self, save: SaveBindings) -> None:
        """Keep each TCP connection a binding uses alive until the binding goes
        (PJSIP-NOTES §3): calls to that phone must reuse the phone's connection."""
        if self.module is None:
            return
        new = {b.conn for b in save.bindings if b.conn}
        old = self.held_by_device.get(save.device_id, set())
        for conn in new - old:
            self.module.hold(conn)
        for conn in old - new:
            self.module.release(conn)
        if new:
            self.held_by_device[save.device_id] = new
        else:
            self.held_by_device.pop(save.device_id, None)

    def flush(self) -> None:
        """Write batched binding changes and call records, then release the answers held for them."""
        self.commit.flush(time.time())
