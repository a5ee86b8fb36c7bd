"""``workers: N``: the supervisor that runs N router processes, and what they share.

Theory of operation.  ``sip-router run`` with ``workers`` above 1 becomes a
supervisor.  It makes one Unix datagram pair per worker (the hand-over
channels, ``router.sip.sharing``), forks N workers (``router.forked``), each
running ``sip-router run`` with its channels in the environment, and then only
watches:

- each worker has its own PJSIP endpoint, reads the shared UDP ports and its
  own port (listen port + 1 + index), keeps the bindings of its own users,
  and writes bindings, changes and call records to the one state database;
- the supervisor serves the control socket itself and asks every worker's
  (``<control socket>.<index>``), adding their answers up, so ``status``,
  ``calls --live``, ``unregister`` and ``reload`` speak for the whole router;
- SIGHUP is passed on to each worker; SIGTERM/SIGINT stop them all (SIGKILL
  after ``STOP_TIMEOUT``);
- a worker that exits on its own stops the others and the supervisor exits
  with that worker's status, so systemd restarts the router as one service.

Worker 0 registers to the trunk and serves the metrics on ``metrics.port``;
worker k serves them on ``metrics.port + k``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from router import control_client, log
from router.control.server import ControlError, ControlServer
from router.control.systemd import Notifier
from router.forked import Forked, fork
from router.policy.model import Policy
from router.sip.sharing import ENV, make_pairs, send_secret, worker_env
from router.sip.steer import Steering
from router.store.sqlite import StateError, connect

EXIT_STATE = 4               # as the router's own (router.app): the state database cannot be used
STOP_TIMEOUT = 8.0           # seconds the workers get to flush and stop before SIGKILL
POLICY_ENV = "SIP_ROUTER_POLICY_FD"    # the parsed policy, handed to each worker
SUPERVISOR_ENV = "SIP_ROUTER_SUPERVISOR"   # the supervisor's PID: a worker's parent while it lives
READY_TIMEOUT = 300.0        # seconds a worker may take to load a large policy
ASK_TIMEOUT = 5.0
STATUS_TIMEOUT = 2.0          # per worker: `status` answers within the CLI's 10 s even with workers stuck
_HIDDEN_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")   # systemd talks to the supervisor only


def own_ports(policy: Policy, index: int) -> tuple[int, ...]:
    """Worker ``index``'s own port for each ``listen:`` entry."""
    return tuple(x.port + 1 + index for x in policy.listen)


def steering(policy: Policy, count: int, user_id: Callable[[str], str]) -> Steering:
    """How ``count`` workers of ``policy`` share its ports: every worker's own ports, and
    the addresses that name this router in a Route."""
    return Steering(count, {port: k for k in range(count) for port in own_ports(policy, k)},
                    frozenset(h for x in policy.listen for h in (x.address, x.advertise) if h), user_id,
                    challenge_anywhere=True)


def worker_socket(path: str, index: int | None) -> str:
    """Worker ``index``'s control socket (the router's own when it runs alone)."""
    return path if index is None else f"{path}.{index}"


def user_id_of(policy: Policy, user: str) -> str:
    """A URI user (an id or an extension) as the user id that decides its worker."""
    found = policy.user(user)
    return found.id if found is not None else user


def supervisor_gone() -> bool:
    """Has the supervisor that started this worker ended (killed outright, without
    stopping its workers)?  Its PID, given at the start, is then no longer this
    process's parent.  False for a process no supervisor started."""
    given = os.environ.get(SUPERVISOR_ENV, "")
    return given.isdigit() and os.getppid() != int(given)


def policy_file(parsed: bytes) -> int:
    """An anonymous in-memory file holding the parsed policy, for the workers to inherit."""
    fd = os.memfd_create("sip-router-policy", os.MFD_CLOEXEC)
    view = memoryview(parsed)
    while view:
        view = view[os.write(fd, view):]
    return fd


def inherited_policy() -> bytes | None:
    """The parsed policy the supervisor handed this worker, if it did (read once, then closed)."""
    value = os.environ.pop(POLICY_ENV, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


class Supervisor:
    def __init__(self, config_path: str, policy: Policy) -> None:
        self.config_path = config_path
        self.count = policy.workers
        self.control_path = policy.control_socket
        self.log = log.get("router")
        self.children: list[Forked] = []
        self.stop = False
        self.reload = False

    # ------------------------------------------------------------------ the workers
    def start(self, policy_fd: int | None) -> None:
        """Start the workers; ``policy_fd``: the parsed policy for them to read (closed here)."""
        pairs = make_pairs(self.count)
        try:
            send_secret(pairs, os.urandom(32))
            for index in range(self.count):
                value, fds = worker_env(index, pairs)
                extra = {ENV: value, SUPERVISOR_ENV: str(os.getpid())}
                if policy_fd is not None:
                    extra[POLICY_ENV] = str(policy_fd)
                    fds = [*fds, policy_fd]
                self.children.append(fork(self._worker_main, extra, fds, drop_env=_HIDDEN_ENV))
        finally:                     # the workers hold them now
            for inbox, outbox in pairs:
                inbox.close()
                outbox.close()
            if policy_fd is not None:
                os.close(policy_fd)
        self.log.info("workers.started", workers=self.count, pids=[c.pid for c in self.children])

    def _worker_main(self) -> int:
        """In a forked child: ``sip-router run``, which finds itself a worker."""
        from router.cli import main
        return main(["run", "--config", self.config_path])

    def exited(self) -> tuple[int, int] | None:
        """(index, status) of a worker that is gone, if any."""
        for index, child in enumerate(self.children):
            code = child.poll()
            if code is not None:
                return index, code
        return None

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def stop_all(self) -> int:
        """Stop every worker; the worst exit status among them."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        worst = 0
        for index, child in enumerate(self.children):
            try:
                code = child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.error("worker.killed", worker=index, pid=child.pid,
                               detail=f"did not stop within {STOP_TIMEOUT:g} s")
                child.kill()
                code = child.wait()
            worst = worst or (code if code > 0 else 0)
        return worst

    def ready(self, pending: set[int]) -> set[int]:
        """The workers in ``pending`` that do not answer on their control socket yet."""
        waiting = set()
        for index in pending:
            try:
                control_client.request(worker_socket(self.control_path, index), "status", timeout=1.0)
            except (control_client.ControlError, control_client.RouterNotRunning, OSError):
                waiting.add(index)
        return waiting

    # ------------------------------------------------------------------ the control socket
    def ask_all(self, command: str, args: dict[str, Any] | None = None,
                timeout: float = ASK_TIMEOUT) -> list[Any]:
        answers: list[Any] = []
        for index in range(self.count):
            try:
                answers.append(control_client.request(worker_socket(self.control_path, index),
                                                      command, args, timeout))
            except (control_client.ControlError, control_client.RouterNotRunning) as exc:
                raise ControlError(f"worker {index}: {exc}") from None
        return answers

    def ask_each(self, command: str, timeout: float) -> list[dict[str, Any] | str]:
        """Every worker's answer, or why it gave none: one wedged worker must not hide the others."""
        answers: list[dict[str, Any] | str] = []
        for index in range(self.count):
            try:
                answer = control_client.request(worker_socket(self.control_path, index), command, None, timeout)
                answers.append(answer if isinstance(answer, dict) else str(answer))
            except (control_client.ControlError, control_client.RouterNotRunning) as exc:
                answers.append(str(exc))
        return answers

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        def status(_args: dict[str, Any]) -> dict[str, Any]:
            answers = self.ask_each("status", STATUS_TIMEOUT)
            if not any(isinstance(a, dict) for a in answers):
                raise ControlError("no worker answers: " + "; ".join(f"worker {i}: {a}" for i, a in enumerate(answers)))
            return merge_status(answers, os.getpid())

        def calls(_args: dict[str, Any]) -> dict[str, Any]:
            merged = [c for answer in self.ask_all("calls") for c in answer.get("calls", [])]
            merged.sort(key=lambda c: c.get("started_at") or 0)
            return {"calls": merged}

        def unregister(args: dict[str, Any]) -> dict[str, Any]:
            answers = self.ask_all("unregister", args)
            return {"device": args.get("device"), "removed": sum(int(a.get("removed") or 0) for a in answers)}

        def reload(_args: dict[str, Any]) -> dict[str, Any]:
            answers = self.ask_all("reload", timeout=control_client.RELOAD_TIMEOUT)
            errors = sorted({str(e) for a in answers for e in a.get("errors") or ()})
            return {"reloaded": all(a.get("reloaded") for a in answers), "errors": errors,
                    "users": answers[0].get("users") if answers else 0}

        return {"status": status, "calls": calls, "unregister": unregister, "reload": reload}


def merge_status(answers: list[dict[str, Any] | str], pid: int) -> dict[str, Any]:
    """One status for the router from each worker's: counts added up over the workers that
    answered, the rest from the first of them; a worker that did not answer is listed with why."""
    answered = [a for a in answers if isinstance(a, dict)]
    merged = dict(answered[0])
    for key in ("registrations", "registrations_by_transport", "calls", "counters"):
        merged[key] = _added([a.get(key) for a in answered])
    merged["pid"] = pid
    merged["workers"] = [
        {"worker": i, "pid": a.get("pid"), "uptime_s": a.get("uptime_s"),
         "registrations": sum(v for v in (a.get("registrations") or {}).values() if isinstance(v, int)),
         "calls": a.get("calls")} if isinstance(a, dict) else {"worker": i, "error": a}
        for i, a in enumerate(answers)]
    if len(answered) < len(answers):
        merged["partial"] = True
    return merged


def _added(values: list[Any]) -> Any:
    if all(isinstance(v, dict) for v in values):
        keys = sorted({k for v in values for k in v})
        return {k: _added([v[k] for v in values if k in v]) for k in keys}
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return sum(numbers) if len(numbers) == len(values) else values[0]


def supervise(config_path: str, policy: Policy, policy_fd: int | None = None) -> int:
    """Run the workers for ``policy`` (the head: no users needed); ``policy_fd``: a
    file holding the child's parse of the file (``policy_file``), handed to each
    worker so none parses it again."""
    supervisor = Supervisor(config_path, policy)
    logger = supervisor.log

    def on_stop(_signum: int, _frame: FrameType | None) -> None:
        supervisor.stop = True

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        supervisor.reload = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    notifier = Notifier()
    try:                             # made and migrated once, before N workers open it at the same moment
        connect(policy.database, durable=True, check_writable=True).close()
    except StateError as exc:
        logger.error("router.start.failed", database=exc.path, reason=exc.reason,
                     detail="the state database cannot be opened or written", exit_status=EXIT_STATE)
        if policy_fd is not None:
            os.close(policy_fd)
        return EXIT_STATE
    os.makedirs(policy.state_dir, exist_ok=True)
    supervisor.start(policy_fd)
    control = ControlServer(policy.control_socket, supervisor.handlers(), log.get("control"))
    control.start()
    pending = set(range(supervisor.count))
    began = time.monotonic()
    next_watchdog = 0.0
    status = 0
    try:
        while not supervisor.stop:
            gone = supervisor.exited()
            if gone is not None:
                index, code = gone
                logger.error("worker.exited", worker=index, pid=supervisor.children[index].pid,
                             exit_status=code, detail="stopping the other workers")
                status = code if code > 0 else 1
                break
            if supervisor.reload:
                supervisor.reload = False
                supervisor.signal_all(signal.SIGHUP)
            if pending:
                pending = supervisor.ready(pending)
                if not pending:
                    logger.info("router.started", pid=os.getpid(), workers=supervisor.count,
                                seconds=round(time.monotonic() - began, 2))
                    notifier.send("READY=1")
                elif time.monotonic() - began > READY_TIMEOUT:
                    logger.error("workers.not_ready", workers=sorted(pending))
                    status = 1
                    break
            if time.monotonic() >= next_watchdog:
                notifier.watchdog()
                next_watchdog = time.monotonic() + 1.0
            time.sleep(0.05 if pending else 0.2)       # a start is timed to the worker that answers last
    finally:
        notifier.send("STOPPING=1")
        control.close()
        worst = supervisor.stop_all()
        notifier.close()
    logger.info("router.stopped", workers=supervisor.count)
    return status or worst
