#!/usr/bin/env python3
"""sip-router and Kamailio side by side: the same SIPp scenarios, users and rates; writes RESULTS.md.

Each part below runs against sip-router, then against Kamailio (the Debian
package; config from ``benchmarks/kamailio/kamailio.cfg``), one server at a
time, on loopback, with the same SIPp scenario, the same N users and the same
offered rates:

  register  REGISTER with digest (401, then credentials, 200), one user per
            registration; Kamailio keeps the credentials in shared memory (htable)
            and the bindings in memory (usrloc db_mode 0)
  single    the ACD (127.0.0.1, trusted by address) calls a user whose one phone
            rings (180), answers (200); ACK, then BYE at once
  redirect  the same call from the redirect ACD (127.0.0.2): the server answers 302
            with the user's contacts
  pdd       single-target calls at 100/s: INVITE->180 through the server minus
            directly to the device farm, p50 and p99
  fork      the user has two registered phones: both ring, one answers, the
            server cancels the other

The phones are SIPp "device farms" (one registered device per user each; the
fork part registers a second farm).  For each scenario the offered rate steps
up until the first step that is not clean (a failed or unfinished call, or the
rate not kept up): the last clean step is the maximum rate.  A fixed run at
100/s gives the server's CPU time per operation (the sum over the server's
processes, from /proc).  The table goes to stdout and to
``benchmarks/RESULTS.md`` (``--quick``: to a temporary file).  Every process
started here is stopped by its PID, also on Ctrl-C.

    .venv/bin/python benchmarks/compare.py --users 100000
    .venv/bin/python benchmarks/compare.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.call_rate import call_scenario, caller, delay_since, pct, router_delay, rtt_values, totals, write_config  # noqa: E402
from benchmarks.kamailio_register import MODULES  # noqa: E402
from router import control_client, policy_cache  # noqa: E402
from tests.integration.peers import SippFarm  # noqa: E402
from tests.support import (  # noqa: E402
    SCENARIOS,
    RouterProcess,
    count_bindings,
    free_port,
    free_port_run,
    options_ping,
    stop_process,
    write_users_config,
)

TEMPLATE = Path(__file__).resolve().parent / "kamailio" / "kamailio.cfg"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ACD = "127.0.0.1"                 # the SIPp caller placing proxied calls
REDIRECT_ACD = "127.0.0.2"        # the SIPp caller that gets 302s
CPU_RATE = 100                    # operations per second of the CPU-per-operation runs
# Past what Kamailio reached with the shorter lists (10,000 registrations and 3,000 calls a second
# were clean): its call maximum is now a measured figure (3,500 calls/s failed); at 14,000
# registrations/s it was still clean, so its register figure remains a lower bound.
REGISTER_RATES = (500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 12000, 14000)
CALL_RATES = (200, 400, 600, 800, 1000, 1250, 1500, 1750, 2000, 2250, 2500, 3000, 3500, 4000)
QUICK_REGISTER_RATES = (500, 1000, 2000)
QUICK_CALL_RATES = (100, 200, 400)
ROUTER = "sip-router"
KAMAILIO = "Kamailio"
PARTS = ("register", "single", "fork")        # server set-ups; "single" also runs redirect and pdd
EXTRA_PARTS = ("start",)    # the router's check and start alone (register also measures them), on request


# --------------------------------------------------------------------------- processes and /proc

def descendants(pid: int) -> list[int]:
    """The PIDs of every live process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        ppid = int(text[text.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) the processes have used so far, in seconds.

    Summed over each process's threads from /proc/PID/task/*/schedstat (nanoseconds),
    or, where the kernel has no schedstat, utime + stime from /proc/PID/stat (clock ticks)."""
    return sum(_process_cpu(pid) for pid in pids)


def _process_cpu(pid: int) -> float:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0                                       # gone
    if tasks and os.path.exists(f"/proc/{pid}/task/{tasks[0]}/schedstat"):
        total = 0
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                    total += int(schedstat.read().split()[0])
            except OSError:
                continue                                 # a thread that just ended
        return total / 1e9
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_kib(pids: Iterable[int]) -> int:
    """Proportional set size summed over processes (shared memory counted once), KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


class Server(Protocol):
    name: str
    port: int

    def pids(self) -> list[int]: ...

    def bindings(self) -> int: ...

    def memory_kib(self) -> int: ...

    def log_tail(self, chars: int = 3000) -> str: ...

    def stop(self) -> None: ...


POLL = 0.02                    # seconds between the probes that time a start


class RouterServer:
    """``python -m router run`` on loopback (via tests.support.RouterProcess)."""

    name = ROUTER

    def __init__(self, config: Path, port: int, users: int) -> None:
        self.config = config
        self.port = port
        self.router = RouterProcess(str(config), port, log_level="warning")
        # 100,000 users take a while to load; polled every 20 ms, so that a start is timed to
        # within that (the 0.2 s of a test's poll would round each start up by up to 0.4 s)
        self.router.start(timeout=max(20.0, users / 1000), poll=POLL)
        self.workers = self._wait_for_workers(max(20.0, users / 1000))

    def _wait_for_workers(self, timeout: float) -> int:
        """With workers, the first answer to OPTIONS may come from one while another still loads:
        wait until the supervisor's status speaks for all of them."""
        text = self.config.read_text()
        if "\nworkers:" not in text:
            return 1
        path = str(self.config.parent / "control.sock")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return len(control_client.request(path, "status", timeout=2.0)["workers"])
            except (control_client.ControlError, control_client.RouterNotRunning):
                time.sleep(POLL)
        raise RuntimeError(f"the router's workers did not all start in {timeout:g} s")

    def pids(self) -> list[int]:
        return [self.router.pid, *descendants(self.router.pid)]

    def bindings(self) -> int:
        return count_bindings(self.config.parent / "router.db")

    def memory_kib(self) -> int:
        return self.router.rss_kib() if self.workers == 1 else pss_kib(self.pids())

    def log_tail(self, chars: int = 3000) -> str:
        return self.router.log_text()[-chars:]

    def stop(self) -> None:
        self.router.stop()


class KamailioServer:
    """Kamailio in the foreground (``-DD -E``) with ``children`` UDP workers, config from the template.

    ``credentials`` (auth username -> password) go to a db_text table that the htable
    module loads into shared memory at start; ``save_flags`` are the registrar's
    save() flags.  The config is checked with ``kamailio -c`` first; its log (stderr)
    stays in ``tmp`` and is shown when it fails."""

    name = KAMAILIO

    def __init__(self, tmp: Path, port: int, users: int, credentials: dict[str, str], children: int,
                 save_flags: str = "0") -> None:
        self.tmp = tmp
        self.port = port
        self.log_path = tmp / "kamailio.log"
        self.proc: subprocess.Popen[bytes] | None = None
        tables = tmp / "credentials"
        tables.mkdir()
        (tables / "version").write_text("table_name(string) table_version(int)\nhtable:2\n")
        rows = ["id(int,auto) key_name(string) key_type(int) value_type(int) key_value(string) expires(int)"]
        rows += [f"{n}:{user}:0:0:{password}:0" for n, (user, password) in enumerate(credentials.items(), 1)]
        (tables / "htable").write_text("\n".join(rows) + "\n")
        self.ctl = tmp / "kamailio.ctl"
        values = {"CHILDREN": str(children), "PORT": str(port), "MODULES": MODULES, "CTL": str(self.ctl),
                  # hash tables of about one slot per entry: 2^n slots
                  "UL_HASH_SIZE": str(min(20, max(10, users.bit_length()))),
                  "HT_SIZE": str(min(20, max(10, len(credentials).bit_length()))),
                  "CREDENTIALS": str(tables), "ROWS": str(len(credentials) + 1), "SAVE_FLAGS": save_flags,
                  "ACD": ACD, "REDIRECT_ACD": REDIRECT_ACD}
        text = TEMPLATE.read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
        if left:
            raise RuntimeError(f"{TEMPLATE}: placeholders without a value: {', '.join(left)}")
        self.config = tmp / "kamailio.cfg"
        self.config.write_text(text)
        check = subprocess.run(["kamailio", "-c", "-f", str(self.config)], capture_output=True, text=True,
                               timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"kamailio -c -f {self.config} failed:\n{check.stdout}{check.stderr}")
        shared_mb = max(256, users // 100)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["kamailio", "-f", str(self.config), "-P", str(tmp / "kamailio.pid"), "-Y", str(tmp), "-DD", "-E",
             "-m", str(shared_mb), "-M", "32"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + max(30.0, users / 1000)      # 200,000 credentials load in ~16 s
            while not options_ping(port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Kamailio did not start (exit code {self.proc.poll()}):\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *descendants(self.proc.pid)]

    def bindings(self) -> int:
        """Contacts in usrloc's "location" table (from the usrloc statistics, over the ctl socket)."""
        out = subprocess.run(["kamcmd", "-s", f"unix:{self.ctl}", "stats.get_statistics", "location_contacts"],
                             capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"location_contacts\s*=\s*(\d+)", out)
        return int(match.group(1)) if match else 0

    def memory_kib(self) -> int:
        return pss_kib(self.pids())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the main process (it stops its children), then SIGKILL to any child left."""
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            print(f"Kamailio exited by itself (exit code {self.proc.returncode}):\n{self.log_tail()}", file=sys.stderr)
        children = descendants(self.proc.pid)
        stop_process(self.proc)
        for pid in children:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    alive = b"kamailio" in cmdline.read()
            except OSError:
                continue
            if alive:
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        self.proc = None


# --------------------------------------------------------------------------- SIPp runs

@dataclass
class Run:
    """One SIPp run against a server."""

    rate: int
    count: int
    ok: int
    failed: int
    elapsed: float
    cpu: float                    # seconds of server CPU during the run

    @property
    def clean(self) -> bool:
        """No call failed, every call completed, and the offered rate was kept up (within 10%)."""
        return self.failed == 0 and self.ok == self.count and self.achieved >= 0.9 * self.rate

    @property
    def achieved(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.ok * 1e6 if self.ok else float("nan")

    def line(self) -> str:
        load = self.cpu / self.elapsed * 100 if self.elapsed else 0.0
        return (f"offered {self.rate}/s: {self.ok}/{self.count} ok, {self.failed} failed, "
                f"{self.achieved:.0f}/s achieved, server CPU {load:.0f}%{'' if self.clean else ' (not clean)'}")


@dataclass
class Side:
    """What one server achieved."""

    max_rate: dict[str, tuple[int, str]] = field(default_factory=dict)   # scenario -> (rate, shown)
    steps: dict[str, list[Run]] = field(default_factory=dict)
    cpu_us: dict[str, float] = field(default_factory=dict)
    cpu_us_busy: dict[str, float] = field(default_factory=dict)          # less the idle server's CPU
    cpu_us_top: dict[str, float] = field(default_factory=dict)           # at the highest clean step
    idle: dict[str, float] = field(default_factory=dict)                  # part -> CPU s per s while idle
    pdd: dict[str, float] = field(default_factory=dict)                   # "p50"/"p99" added, ms
    pdd_detail: str = ""
    memory_kib: dict[str, int] = field(default_factory=dict)              # part -> after its runs
    # the router only: `check` and a start on the register runs' state (seconds, bindings, KiB)
    check_seconds: float | None = None
    starts: dict[str, list[float]] = field(default_factory=dict)        # START_KINDS -> seconds of each start
    start_bindings: int = 0
    start_memory_kib: int | None = None
    errors: list[str] = field(default_factory=list)


def sipp(server: Server, tmp: Path, scenario: Path, rate: int, count: int, users: int, *,
         address: str = ACD, data: Path | None = None, rtt: bool = False, target: str | None = None) -> Run:
    """One SIPp caller run against ``server`` (or ``target``), with the server's CPU time during it."""
    pids = server.pids()
    before = cpu_seconds(pids)
    result, elapsed = caller(tmp, target or f"127.0.0.1:{server.port}", scenario, rate, count, users,
                             rtt=rtt, address=address, data=data)
    cpu = cpu_seconds(pids) - before
    ok, failed = totals(result.stdout)
    run = Run(rate, count, ok, failed, elapsed, cpu)
    if not run.clean and result.returncode not in (0, 1):
        print(f"    sipp exit {result.returncode}: {result.stderr.strip()[-500:]}", file=sys.stderr)
    return run


def settle(server: Server, limit: float = 30.0) -> None:
    """Wait (at most ``limit`` s) until the server is nearly idle: under 5% of a CPU for half a second."""
    pids = server.pids()
    deadline = time.monotonic() + limit
    last = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pids)
        if now - last < 0.025:
            return
        last = now


def step_rates(server: Server, side: Side, scenario: str, rates: Sequence[int], seconds: float,
               run: Callable[[int, int], Run]) -> None:
    """Offer each rate for ``seconds`` until a step is not clean twice in a row; the last clean rate
    is the maximum."""
    best = 0
    steps: list[Run] = []
    for rate in rates:
        for attempt in range(2):
            settle(server)
            step = run(rate, max(1, int(rate * seconds)))
            steps.append(step)
            print(f"  {server.name} {scenario}: {step.line()}{' (repeated)' if attempt else ''}", flush=True)
            # A step that is not clean is run once more, for either server alike: on a busy
            # 2-core host SIPp itself loses the odd call (one in 8,000 at 800/s, with the
            # server at half a core), and one loss must not end the stepping.
            if step.clean:
                break
        if not step.clean:
            break
        best = rate
    side.steps[scenario] = steps
    clean = [step for step in steps if step.clean]
    if clean:
        side.cpu_us_top[scenario] = clean[-1].cpu_us
    if best == 0:
        side.max_rate[scenario] = (0, f"< {rates[0]}")
    elif steps[-1].clean:
        side.max_rate[scenario] = (best, f">= {best}")
    else:
        side.max_rate[scenario] = (best, str(best))


def idle_cpu(server: Server, seconds: float) -> float:
    """The server's CPU time per second while nothing is sent to it (timers, housekeeping)."""
    settle(server)
    pids = server.pids()
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds


def cpu_run(server: Server, side: Side, scenario: str, run: Run, idle: float) -> None:
    side.cpu_us[scenario] = run.cpu_us
    side.cpu_us_busy[scenario] = (run.cpu - idle * run.elapsed) / run.ok * 1e6 if run.ok else float("nan")
    print(f"  {server.name} {scenario} at {run.rate}/s: {run.cpu_us:.0f} us CPU per operation "
          f"({side.cpu_us_busy[scenario]:.0f} us less the idle CPU); {run.line()}", flush=True)


def measure_idle(server: Server, side: Side, part: str, seconds: float) -> float:
    idle = side.idle[part] = idle_cpu(server, seconds)
    print(f"  {server.name} idle: {idle * 100:.1f}% of a core", flush=True)
    return idle


def credentials(csv: Path) -> dict[str, str]:
    """Auth username -> password from a SIPp injection file's ``[authentication ...]`` fields."""
    return dict(re.findall(r"\[authentication username=(\S+) password=(\S+?)\]", csv.read_text()))


def wait_bindings(server: Server, farms: Sequence[SippFarm], expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = server.bindings()
        if count >= expected:
            return count
        for farm in farms:
            if farm.proc is not None and farm.proc.poll() is not None:
                raise RuntimeError(f"device farm {farm.name} exited: {farm.out.read_text(errors='replace')[-1500:]}")
        time.sleep(0.5)
    raise RuntimeError(f"{server.name}: only {count} of {expected} devices registered in {timeout:.0f} s")


# --------------------------------------------------------------------------- the parts

@dataclass
class Options:
    users: int
    children: int
    workers: int
    register_rates: tuple[int, ...]
    call_rates: tuple[int, ...]
    step_seconds: float
    cpu_seconds: float
    idle_seconds: float
    farm_rate: int


def show_log(server: Server) -> None:
    tail = server.log_tail().strip()
    print(f"  {server.name} log (last lines):\n{tail}" if tail else f"  {server.name} log is empty", file=sys.stderr)


def start_server(kind: str, tmp: Path, port: int, users: int, config: Path, logins: dict[str, str],
                 opts: Options, save_flags: str = "0") -> Server:
    if kind == ROUTER:
        return RouterServer(config, port, users)
    return KamailioServer(tmp, port, users, logins, opts.children, save_flags)


def server_port(kind: str, opts: Options) -> int:
    """A free port; for the router with workers, followed by one free port per worker."""
    return free_port_run(opts.workers + 1) if kind == ROUTER and opts.workers > 1 else free_port()


def with_workers(kind: str, config: Path, opts: Options) -> None:
    if kind == ROUTER and opts.workers > 1:
        with open(config, "a") as out:
            out.write(f"workers: {opts.workers}\n")


def part_register(kind: str, tmp: Path, opts: Options, side: Side) -> None:
    port = server_port(kind, opts)
    config, csv = write_users_config(str(tmp), port, opts.users)
    with_workers(kind, Path(config), opts)
    # one binding per device in both: the router's max_bindings_per_device: 1, Kamailio's save() flag 0x04
    server = start_server(kind, tmp, port, opts.users, Path(config), credentials(Path(csv)), opts, "0x04")
    try:
        scenario = SCENARIOS / "register_digest.xml"

        def run(rate: int, count: int) -> Run:
            return sipp(server, tmp, scenario, rate, count, opts.users, data=Path(csv))

        idle = measure_idle(server, side, "register", opts.idle_seconds)
        cpu_run(server, side, "register", run(CPU_RATE, int(CPU_RATE * opts.cpu_seconds)), idle)
        step_rates(server, side, "register", opts.register_rates, opts.step_seconds, run)
        side.memory_kib["register"] = server.memory_kib()
    except Exception:
        show_log(server)
        raise
    finally:
        server.stop()
    if kind == ROUTER:
        startup(Path(config), port, opts, side)


START_KINDS = {
    "new": "the YAML never parsed before (nothing kept: every user read)",
    "edited": "the YAML after one user was edited (the users whose text did not change kept)",
    "unchanged": "the unchanged YAML (its parse kept)",
}


def edit_one_user(config: Path, round_: int) -> None:
    """Give one user in the middle of the list a display name, another user each round."""
    text = config.read_text()
    count = text.count("\n  - {id: u")
    index = (count // 2 + round_ * 997) % count
    before = f"\n  - {{id: u{index}, "
    if before not in text:
        raise RuntimeError(f"user u{index} is not in {config}")
    config.write_text(text.replace(before, f"{before}display_name: Edited {round_}, ", 1))


def startup(config: Path, port: int, opts: Options, side: Side) -> None:
    """``sip-router check`` of the YAML (the median of three), then starts on the state the register
    runs left (every user registered), three times each of ``START_KINDS``, in turn: the time until
    the router -- every worker -- answers (medians, and the range), and its memory."""
    times = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "router", "-c", str(config), "check"], cwd=ROOT,
                       capture_output=True, check=True, timeout=300)
        times.append(time.monotonic() - started)
    side.check_seconds = sorted(times)[1]
    side.start_bindings = count_bindings(config.parent / "router.db")
    side.starts = {kind: [] for kind in START_KINDS}
    memory = []
    for round_ in range(3):                   # medians: one start on a shared host varies by seconds
        policy_cache.forget(str(config))      # nothing kept: every user is read
        took, kib = timed_start(config, port, opts.users)
        side.starts["new"].append(took)
        memory.append(kib)
        edit_one_user(config, round_)
        side.starts["edited"].append(timed_start(config, port, opts.users)[0])
        side.starts["unchanged"].append(timed_start(config, port, opts.users)[0])
    side.start_memory_kib = sorted(memory)[1]
    took = ", ".join(f"{kind} {sorted(times)[1]:.1f} s" for kind, times in side.starts.items())
    print(f"  {ROUTER}: check {side.check_seconds:.1f} s; start with {side.start_bindings} bindings: {took}; "
          f"memory {side.start_memory_kib / 1024:.0f} MiB", flush=True)


def timed_start(config: Path, port: int, users: int) -> tuple[float, int]:
    """Seconds until every router process answers, and its memory (KiB) 1 s later."""
    started = time.monotonic()
    server = RouterServer(config, port, users)
    try:
        took = time.monotonic() - started
        time.sleep(1.0)                       # settled: the parse child gone, the first tick done
        return took, server.memory_kib()
    finally:
        server.stop()


def part_start(tmp: Path, opts: Options, side: Side) -> None:
    """The router's check and starts alone, on the register part's YAML with every user's
    phone registered (at the device farms' rate), then ``startup``."""
    port = server_port(ROUTER, opts)
    config, csv = write_users_config(str(tmp), port, opts.users)
    with_workers(ROUTER, Path(config), opts)
    server = start_server(ROUTER, tmp, port, opts.users, Path(config), credentials(Path(csv)), opts)
    try:
        run = sipp(server, tmp, SCENARIOS / "register_digest.xml", opts.farm_rate, opts.users, opts.users,
                   data=Path(csv))
        print(f"  {ROUTER}: {run.ok} of {opts.users} users registered ({run.failed} failed)", flush=True)
    finally:
        server.stop()
    startup(Path(config), port, opts, side)


def part_calls(kind: str, tmp: Path, opts: Options, side: Side, fork: bool) -> None:
    """``fork``: two phones per user; otherwise one phone per user (single, redirect and pdd)."""
    port = server_port(kind, opts)
    config = write_config(tmp, port, opts.users, "all_devices" if fork else "ip_phone", False,
                          redirect_peer=REDIRECT_ACD)
    with_workers(kind, config, opts)
    farms = [SippFarm(tmp, port, opts.users, "a", "answer", rate=opts.farm_rate)]
    if fork:
        farms.append(SippFarm(tmp, port, opts.users, "b", "ring", rate=opts.farm_rate))
    logins: dict[str, str] = {}
    for farm in farms:
        logins.update(credentials(tmp / f"{farm.name}.csv"))
    server = start_server(kind, tmp, port, opts.users, config, logins, opts)
    try:
        for farm in farms:
            farm.start()
        expected = opts.users * len(farms)
        started = time.monotonic()
        wait_bindings(server, farms, expected, timeout=60 + 3 * opts.users / opts.farm_rate)
        print(f"  {kind}: {expected} devices registered in {time.monotonic() - started:.1f} s", flush=True)
        scenarios = {mode: call_scenario(tmp / f"caller-{mode}.xml", mode) for mode in ("single", "redirect", "fork")}
        cpu_count = int(CPU_RATE * opts.cpu_seconds)
        idle = measure_idle(server, side, "fork" if fork else "single", opts.idle_seconds)

        def calls(mode: str) -> Callable[[int, int], Run]:
            address = REDIRECT_ACD if mode == "redirect" else ACD
            return lambda rate, count: sipp(server, tmp, scenarios[mode], rate, count, opts.users, address=address)

        if fork:
            cpu_run(server, side, "fork", calls("fork")(CPU_RATE, cpu_count), idle)
            step_rates(server, side, "fork", opts.call_rates, opts.step_seconds, calls("fork"))
            side.memory_kib["fork"] = server.memory_kib()
            return
        # pdd: single calls at 100/s through the server (this run also gives the CPU per single call),
        # then the same calls straight to the answering farm
        workers = opts.workers if kind == ROUTER else 0
        delay_before = router_delay(workers)
        through_run = sipp(server, tmp, scenarios["single"], CPU_RATE, cpu_count, opts.users, rtt=True)
        delay = delay_since(delay_before, workers)
        through = rtt_values(tmp)
        cpu_run(server, side, "single", through_run, idle)
        direct_run = sipp(server, tmp, scenarios["single"], CPU_RATE, cpu_count, opts.users, rtt=True,
                          target=f"127.0.0.1:{farms[0].port}")
        direct = rtt_values(tmp)
        for p in (50, 99):
            side.pdd[f"p{p}"] = pct(through, p) - pct(direct, p)
        side.pdd_detail = (f"through {pct(through, 50):.2f} / {pct(through, 99):.2f} ms ({len(through)} calls, "
                           f"{through_run.failed} failed), direct {pct(direct, 50):.2f} / {pct(direct, 99):.2f} ms "
                           f"({len(direct)} calls, {direct_run.failed} failed)")
        if delay:
            side.pdd_detail += f"; {delay}"
        print(f"  {kind} pdd p50/p99: {side.pdd_detail}", flush=True)
        settle(server)
        cpu_run(server, side, "redirect", calls("redirect")(CPU_RATE, cpu_count), idle)
        step_rates(server, side, "single", opts.call_rates, opts.step_seconds, calls("single"))
        step_rates(server, side, "redirect", opts.call_rates, opts.step_seconds, calls("redirect"))
        side.memory_kib["single"] = server.memory_kib()
    except Exception:
        show_log(server)
        raise
    finally:
        for farm in farms:
            farm.stop()
        server.stop()


# --------------------------------------------------------------------------- the report

def machine() -> list[tuple[str, str]]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    kamailio = subprocess.run(["kamailio", "-v"], capture_output=True, text=True, timeout=10).stdout
    sipp_version = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"SIPp v(\S+)", sipp_version)
    return [("CPU", f"{cpu}, {os.cpu_count()} cores"), ("kernel", platform.release()),
            ("Python", platform.python_version()),
            ("Kamailio", kamailio.splitlines()[0].removeprefix("version: ").strip() if kamailio else "unknown"),
            ("SIPp", found.group(1).rstrip(".") if found else "unknown")]


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0 or a == 0:
        return "n/a"
    return f"{a / b:.2f}"


def table(sides: dict[str, Side]) -> list[str]:
    r, k = sides[ROUTER], sides[KAMAILIO]
    rows = ["| scenario | sip-router | Kamailio | ratio (router/Kamailio) |", "|---|---:|---:|---:|"]
    units = {"register": "registrations/s", "single": "calls/s", "fork": "calls/s", "redirect": "calls/s"}
    for name, unit in units.items():
        if name in r.max_rate or name in k.max_rate:
            a, b = r.max_rate.get(name, (0, "n/a")), k.max_rate.get(name, (0, "n/a"))
            rows.append(f"| {name}: max rate with 0 failures ({unit}) | {a[1]} | {b[1]} | {ratio(a[0], b[0])} |")
    for name in units:
        what = "registration" if name == "register" else "call"
        for label, a_map, b_map in ((f"server CPU per {what} at {CPU_RATE}/s (us)", r.cpu_us, k.cpu_us),
                                    ("the same, less the idle server's CPU (us)", r.cpu_us_busy, k.cpu_us_busy),
                                    (f"server CPU per {what} at the max rate (us)", r.cpu_us_top, k.cpu_us_top)):
            a_us, b_us = a_map.get(name), b_map.get(name)
            if a_us is not None or b_us is not None:
                rows.append(f"| {name}: {label} | {_num(a_us)} | {_num(b_us)} | {ratio(a_us, b_us)} |")
    for part in PARTS:
        if part in r.idle or part in k.idle:
            a_idle, b_idle = r.idle.get(part), k.idle.get(part)
            rows.append(f"| idle server CPU, {part} set-up (% of a core) | {_num(a_idle and a_idle * 100, 2)} | "
                        f"{_num(b_idle and b_idle * 100, 2)} | {ratio(a_idle, b_idle)} |")
    rows += startup_rows(r)
    for p in ("p50", "p99"):
        if p in r.pdd or p in k.pdd:
            a_ms, b_ms = r.pdd.get(p), k.pdd.get(p)
            rows.append(f"| pdd: INVITE->180 added at {CPU_RATE} calls/s, {p} (ms) | {_num(a_ms, 2)} | "
                        f"{_num(b_ms, 2)} | {ratio(a_ms, b_ms)} |")
    for part in PARTS:
        if part in r.memory_kib or part in k.memory_kib:
            a_kib, b_kib = r.memory_kib.get(part), k.memory_kib.get(part)
            rows.append(f"| memory after the {part} runs (MiB; router RSS, or PSS of all its processes with "
                        f"workers; Kamailio PSS of all processes) | "
                        f"{_num(a_kib / 1024 if a_kib else None, 1)} | {_num(b_kib / 1024 if b_kib else None, 1)} | "
                        f"{ratio(a_kib, b_kib)} |")
    return rows


def startup_rows(r: Side) -> list[str]:
    """The router's check, start and memory rows (none until ``startup`` ran)."""
    if r.check_seconds is None or not r.starts or r.start_memory_kib is None:
        return []
    rows = [f"| `sip-router check` of the YAML (s; median of 3) | {r.check_seconds:.1f} | | |"]
    for kind, times in r.starts.items():
        rows.append(f"| start on the state of registered users, {r.start_bindings} bindings, until every process "
                    f"answers: {START_KINDS[kind]} (s; median of {len(times)}, range "
                    f"{min(times):.1f}-{max(times):.1f}) | {sorted(times)[len(times) // 2]:.1f} | | |")
    rows.append(f"| memory 1 s after a start (MiB; RSS, or PSS of all processes with workers) | "
                f"{r.start_memory_kib / 1024:.1f} | | |")
    return rows


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def byte_compile() -> None:
    """Byte-compile the router's modules, as the installed service's are (pip compiles them
    on install): every start and check then reads them compiled.  Without it, with
    PYTHONDONTWRITEBYTECODE set (as on this host) each process compiles every module it
    imports at every start, ~0.3 s on a 100,000-user start that a real one never pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "router")], check=True,
                   stdout=subprocess.DEVNULL)


COMPILED = "- sip-router's modules byte-compiled before the runs (`python -m compileall router`), as installed"


def start_report(side: Side, opts: Options, command: str, started: datetime.datetime, minutes: float,
                 quick: bool) -> str:
    """The report of ``--parts start`` alone: the router's check and starts, nothing side by side."""
    processes = "one process" if opts.workers == 1 else f"{opts.workers} worker processes (`workers: {opts.workers}`)"
    lines = ["# sip-router: check and start", ""]
    if quick:
        lines += ["**Quick smoke run (`--quick`): few users; not a measurement.**", ""]
    lines += [f"- date: {started:%Y-%m-%d %H:%M} (took {minutes:.0f} min)"]
    lines += [f"- {name}: {value}" for name, value in machine() if name not in ("Kamailio", "SIPp")]
    lines += [f"- command: `{command}`",
              f"- users: {opts.users}, one phone each (`tests/support.py` write_users_config, the register part's "
              f"YAML); sip-router: {processes}", COMPILED,
              f"- before the starts every user registers once (SIPp, register with digest at {opts.farm_rate}/s); "
              "each start is timed until every worker answers (OPTIONS, then the supervisor's status lists them "
              "all); memory is the PSS of all its processes 1 s later",
              "", *table({ROUTER: side, KAMAILIO: Side()})[:2], *startup_rows(side), ""]
    errors = [f"- {error}" for error in side.errors]
    return "\n".join(lines + (["## Errors", "", *errors] if errors else [])) + "\n"


def report(sides: dict[str, Side], opts: Options, command: str, started: datetime.datetime, minutes: float,
           quick: bool) -> str:
    lines = ["# sip-router and Kamailio, side by side", ""]
    if quick:
        lines += ["**Quick smoke run (`--quick`): few users and short runs; not a measurement.**", ""]
    lines += [f"- date: {started:%Y-%m-%d %H:%M} (took {minutes:.0f} min)"]
    lines += [f"- {name}: {value}" for name, value in machine()]
    processes = "one process" if opts.workers == 1 else f"{opts.workers} worker processes (`workers: {opts.workers}`)"
    lines += [f"- command: `{command}`",
              f"- users: {opts.users} (the router's YAML users = Kamailio's AORs; the same SIPp injection files)",
              f"- Kamailio: {opts.children} UDP worker processes, credentials in shared memory (htable), "
              f"bindings in memory (usrloc db_mode 0); sip-router: {processes}, bindings in SQLite", COMPILED,
              f"- rate steps of {opts.step_seconds:g} s: register {', '.join(map(str, opts.register_rates))}; "
              f"calls {', '.join(map(str, opts.call_rates))}; stepping stops at the first step that is not clean "
              "(a failed or unfinished call, or under 90% of the offered rate achieved) twice in a row: "
              "a step that is not clean is repeated once",
              f"- Kamailio config: `{TEMPLATE.relative_to(ROOT)}`; sip-router YAML: `benchmarks/call_rate.py` "
              "write_config (calls) and `tests/support.py` write_users_config (register)",
              f"- CPU per operation: a {opts.cpu_seconds:g} s run at {CPU_RATE}/s, server CPU time (user + system, "
              "all its processes and threads, from /proc/PID/task/*/schedstat) divided by the operations that "
              f"succeeded; the idle server's CPU is measured over {opts.idle_seconds:g} s just before; \"at the max "
              "rate\": the same from the last clean rate step",
              "- pdd: INVITE->180 through the server minus straight to the answering device farm, single-target "
              f"calls at {CPU_RATE}/s (the same run gives the CPU per single call)",
              "- SIPp (caller and device farms) runs on the same machine and shares its cores", "", *table(sides), ""]
    lines += ["Ratios: for rates, above 1 means sip-router sustains more; for CPU, delay and memory, above 1 means "
              "sip-router costs more.", "", "## Rate steps", "",
              "| scenario | server | offered/s | ok | failed | achieved/s | server CPU (% of a core) | clean |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for scenario in ("register", "single", "fork", "redirect"):
        for name, side in sides.items():
            for step in side.steps.get(scenario, []):
                load = step.cpu / step.elapsed * 100 if step.elapsed else 0.0
                lines.append(f"| {scenario} | {name} | {step.rate} | {step.ok} | {step.failed} | {step.achieved:.0f} "
                             f"| {load:.0f} | {'yes' if step.clean else 'no'} |")
    details = [f"- {name}: {side.pdd_detail}" for name, side in sides.items() if side.pdd_detail]
    if details:
        lines += ["", "## INVITE->180 at 100 calls/s, p50 / p99", "", *details]
    errors = [f"- {name}: {error}" for name, side in sides.items() for error in side.errors]
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=0, help="users (default 100000; --quick: 500)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few users, three short steps each")
    parser.add_argument("--workers", type=int, default=1, help="sip-router worker processes (`workers:`)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1, help="Kamailio UDP worker processes")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)} "
                        "(single also runs redirect and pdd), or start: the router's check and start alone")
    parser.add_argument("--step-seconds", type=float, default=0, help="length of each rate step (default 10; quick 2)")
    parser.add_argument("--cpu-seconds", type=float, default=0, help=f"length of the {CPU_RATE}/s CPU runs "
                        "(default 30; quick 3)")
    parser.add_argument("--farm-rate", type=int, default=500, help="device registrations per second per farm")
    parser.add_argument("--register-rates", default="", help="comma-separated offered rates for register")
    parser.add_argument("--call-rates", default="", help="comma-separated offered rates for calls")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the report (default benchmarks/RESULTS.md; --quick: a temporary file)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS) - set(EXTRA_PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    for tool in ("sipp", "kamailio", "kamcmd"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")

    def rates(text: str, default: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip()) if text else default

    opts = Options(users=args.users or (500 if args.quick else 100000), children=args.children,
                   workers=args.workers,
                   register_rates=rates(args.register_rates, QUICK_REGISTER_RATES if args.quick else REGISTER_RATES),
                   call_rates=rates(args.call_rates, QUICK_CALL_RATES if args.quick else CALL_RATES),
                   step_seconds=args.step_seconds or (2 if args.quick else 10),
                   cpu_seconds=args.cpu_seconds or (3 if args.quick else 30),
                   idle_seconds=2 if args.quick else 10, farm_rate=args.farm_rate)
    output = args.output or (Path(tempfile.gettempdir()) / "sip-router-compare-quick.md" if args.quick else RESULTS)
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = shlex.join([python, os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]])
    started, clock = datetime.datetime.now(), time.monotonic()
    sides = {ROUTER: Side(), KAMAILIO: Side()}
    byte_compile()
    base = Path(tempfile.mkdtemp(prefix="sip-router-compare-"))
    os.environ.pop("CACHE_DIRECTORY", None)        # the routers' parsed YAMLs go with the rest
    os.environ["XDG_CACHE_HOME"] = str(base / "cache")
    try:
        for part in parts:
            for kind in (ROUTER,) if part in EXTRA_PARTS else (ROUTER, KAMAILIO):
                print(f"{part}: {kind}, {opts.users} users", flush=True)
                tmp = base / f"{part}-{kind.lower()}"
                tmp.mkdir()
                try:
                    if part == "start":
                        part_start(tmp, opts, sides[kind])
                    elif part == "register":
                        part_register(kind, tmp, opts, sides[kind])
                    else:
                        part_calls(kind, tmp, opts, sides[kind], fork=part == "fork")
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    message = str(exc).strip()
                    print(f"  {kind} {part} failed: {message[-3000:]}", file=sys.stderr, flush=True)
                    sides[kind].errors.append(f"{part}: {message.splitlines()[0] if message else type(exc).__name__}")
    finally:
        if args.keep:
            print(f"temporary files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    minutes = (time.monotonic() - clock) / 60
    text = (start_report(sides[ROUTER], opts, command, started, minutes, args.quick) if set(parts) <= set(EXTRA_PARTS)
            else report(sides, opts, command, started, minutes, args.quick))
    output.write_text(text)
    print()
    print("\n".join(table(sides)))
    print(f"\nreport written to {output}")
    return 1 if any(side.errors for side in sides.values()) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process started here has been stopped", file=sys.stderr)
        sys.exit(130)
