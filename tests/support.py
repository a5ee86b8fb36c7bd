"""Helpers shared by integration tests and benchmarks: the real router process and SIPp.

Everything runs on loopback.  Every process started here is stopped by its PID
when the ``with`` block ends, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "scenarios"
DOMAIN = "pbx.test"


def private_cache(directory: str | os.PathLike[str]) -> None:
    """Routers started from here on keep their parsed YAMLs under ``directory`` (removed with
    it), not in the user's ``~/.cache/sip-router``: a benchmark's generated users are parsed
    into a new entry each run."""
    os.environ.pop("CACHE_DIRECTORY", None)
    os.environ["XDG_CACHE_HOME"] = os.path.join(directory, "cache")


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A loopback port free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, other) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port")


def free_port_run(count: int) -> int:
    """A loopback port P such that P .. P+count-1 are free for UDP and TCP right now
    (a router with workers uses its listen port and one port per worker after it)."""
    for _ in range(100):
        first = free_port()
        if first + count > 65535:
            continue
        ok = True
        for port in range(first + 1, first + count):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    try:
                        s.bind(("127.0.0.1", port))
                    except OSError:
                        ok = False
        if ok:
            return first
    raise RuntimeError(f"no run of {count} free loopback ports")


def write_users_config(directory: str, port: int, users: int) -> tuple[str, str]:
    """A policy with ``users`` users of one ip_phone each, and the SIPp CSV for them."""
    config = Path(directory) / "router.yaml"
    lines = [f"domain: {DOMAIN}", f"state_dir: {directory}",
             f"listen: [{{address: 127.0.0.1, port: {port}}}]",
             "registrar: {max_bindings_per_device: 1, source_failures_per_minute: 100000}",
             "log: {level: warning, format: json}", "users:"]
    csv = ["SEQUENTIAL"]
    for i in range(users):
        lines.append(f"  - {{id: u{i}, extension: '{10000 + i}', receive_method: ip_phone, devices: "
                     f"[{{id: d{i}, kind: ip_phone, username: d{i}, password: pw{i}}}]}}")
        csv.append(f"u{i};d{i};[authentication username=d{i} password=pw{i}];{DOMAIN}")
    config.write_text("\n".join(lines) + "\n")
    csv_path = Path(directory) / "users.csv"
    csv_path.write_text("\n".join(csv) + "\n")
    return str(config), str(csv_path)


def options_ping(port: int, timeout: float = 0.2) -> bool:
    """True when the router answers an OPTIONS on ``port`` with 200."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        me = s.getsockname()[1]
        s.sendto((f"OPTIONS sip:{DOMAIN} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{time.monotonic_ns()}\r\n"
                  f"From: <sip:ping@{DOMAIN}>;tag=1\r\nTo: <sip:{DOMAIN}>\r\nCall-ID: ping-{time.monotonic_ns()}\r\n"
                  "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode(), ("127.0.0.1", port))
        try:
            data = s.recv(4096)
        except OSError:
            return False
    return data.startswith(b"SIP/2.0 200")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """Stop a child by its PID: SIGTERM, then SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def json_events(text: str, name: str | None = None) -> list[dict[str, object]]:
    """The JSON log lines in ``text`` (all, or those whose event is ``name``)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or entry.get("event") == name:
                out.append(entry)
    return out


class RouterProcess:
    """``sip-router run`` as a child process; logs in JSON to a file."""

    def __init__(self, config: str, port: int, log_level: str = "info",
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        self.log_path = Path(config).with_suffix(f".{port}.log")
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0, poll: float = 0.2) -> RouterProcess:
        """Start it and wait until it answers an OPTIONS; ``poll``: how long each OPTIONS
        waits for its answer (a start is timed to within about that)."""
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "router", "-c", self.config, "run"],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log_text()}")
            if options_ping(self.port, poll):
                return self
        self.stop()
        raise RuntimeError(f"router did not start in {timeout} s:\n{self.log_text()}")

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time; returns the exit code."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self._log.close()

    def log_text(self) -> str:
        return read_log(self.log_path)

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        return json_events(self.log_text(), name)

    def wait_for(self, name: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count}x {name} in the router log:\n{self.log_text()[-3000:]}")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


def run_sipp(scenario: str, port: int, *args: str, calls: int = 1, timeout: float = 30.0,
             csv: str | None = None, cwd: str | None = None,
             transport: str = "u1") -> subprocess.CompletedProcess[str]:
    """Run one SIPp scenario as UAC against the router; returns the finished process."""
    cmd = ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(free_port()),
           "-m", str(calls), "-nostdin", "-t", transport,
           "-timeout", str(int(timeout)), "-timeout_error", "-trace_err", "-trace_msg"]
    if csv:
        cmd += ["-inf", csv]
    cmd += [*args, f"127.0.0.1:{port}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 15, cwd=cwd)


# --------------------------------------------------------------------------- fault and soak helpers

def proc_usage(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a running process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class RegisterBurst:
    """Many devices register at once from one UDP socket (401, then digest, then 200).

    Written for ``write_users_config``'s users (u<i>, device d<i>, password pw<i>).
    ``run`` keeps up to ``window`` registrations in flight, calls ``on_ack`` with the
    number of 200s so far after each one, and returns when every device has an
    answer, or ``quiet`` seconds pass without a datagram, or ``deadline`` passes.
    ``acked`` holds the devices whose 200 arrived: the router acknowledged them.
    """

    def __init__(self, port: int, users: int, window: int = 200) -> None:
        self.router = ("127.0.0.1", port)
        self.users = users
        self.window = window
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.me = self.sock.getsockname()[1]
        self.tag = f"{os.getpid()}-{time.monotonic_ns()}"
        self.acked: set[str] = set()
        self.refused: dict[str, int] = {}
        self.answered_at: dict[str, float] = {}
        self.sent_at: dict[str, float] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RegisterBurst:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _register(self, i: int, cseq: int, authorization: str = "") -> None:
        text = (f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.me};branch=z9hG4bK-b{i}-{cseq}-{self.tag};rport\r\n"
                f"From: <sip:u{i}@{DOMAIN}>;tag=b{i}\r\nTo: <sip:u{i}@{DOMAIN}>\r\n"
                f"Call-ID: burst-{i}-{self.tag}\r\nCSeq: {cseq} REGISTER\r\n"
                f"Contact: <sip:d{i}@127.0.0.1:{self.me}>\r\nExpires: 3600\r\n"
                f"{authorization}Max-Forwards: 70\r\nUser-Agent: burst\r\nContent-Length: 0\r\n\r\n")
        self.sock.sendto(text.encode(), self.router)

    def _answer_challenge(self, i: int, challenge: object) -> None:
        from router.sip import digest
        from router.sip.message import SipMessage, auth_params
        assert isinstance(challenge, SipMessage)
        offers = {auth_params(v)[1].get("algorithm"): auth_params(v)[1]
                  for v in challenge.all("www-authenticate")}
        params = offers["MD5"]
        uri = f"sip:{DOMAIN}"
        ha1 = digest.ha1("MD5", f"d{i}", params["realm"], f"pw{i}")
        response = digest.response("MD5", ha1, params["nonce"], "REGISTER", uri, "auth", "00000001", "c0ffee")
        self._register(i, 2, f'Authorization: Digest username="d{i}", realm="{params["realm"]}", '
                             f'nonce="{params["nonce"]}", uri="{uri}", response="{response}", '
                             'algorithm=MD5, qop=auth, nc=00000001, cnonce="c0ffee"\r\n')

    def run(self, on_ack: object = None, quiet: float = 1.0, deadline: float = 60.0) -> None:
        from router.sip.message import parse
        end = time.monotonic() + deadline
        started = answered = 0
        last_heard = time.monotonic()
        self.sock.settimeout(0.02)
        while time.monotonic() < end and answered < self.users:
            while started < self.users and started - answered < self.window:
                self.sent_at[f"d{started}"] = time.monotonic()
                self._register(started, 1)
                started += 1
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                if time.monotonic() - last_heard > quiet:
                    return
                continue
            last_heard = time.monotonic()
            msg = parse(data)
            i = int(msg.call_id.split("-")[1])
            device = f"d{i}"
            if msg.status == 401:
                self._answer_challenge(i, msg)
                continue
            if device in self.answered_at:
                continue                     # a retransmitted answer
            self.answered_at[device] = time.monotonic()
            answered += 1
            if msg.status == 200:
                self.acked.add(device)
                if callable(on_ack):
                    on_ack(len(self.acked))
            else:
                self.refused[device] = msg.status


def write_fork_config(directory: str, port: int, users: int, method: str = "all_devices",
                      log_level: str = "warning") -> str:
    """A policy with ``users`` users u<i>, each with an ip_phone a<i> and an app b<i> (password
    p<i>), trusted ACD on loopback, no fallback: the set-up of ``benchmarks/call_rate.py fork``
    (the devices are registered by ``tests.integration.peers.SippFarm``)."""
    lines = [f"domain: {DOMAIN}", f"state_dir: {directory}", f"listen: [{{address: 127.0.0.1, port: {port}}}]",
             "registrar: {max_bindings_per_device: 1, max_expires: 7200, source_failures_per_minute: 1000000}",
             "routing: {fallback: [], ring_timeout: 30}",
             "trusted_peers: [{name: acd, address: 127.0.0.1}]",
             f"log: {{level: {log_level}, format: json}}", "users:"]
    for i in range(users):
        lines.append(f"  - {{id: u{i}, receive_method: {method}, devices: ["
                     f"{{id: a{i}, kind: ip_phone, password: p{i}}}, {{id: b{i}, kind: app, password: p{i}}}]}}")
    path = Path(directory) / "router.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def scrape_histogram(name: str, port: int = 9060) -> list[tuple[float, int]]:
    """A histogram the router serves on its metrics port, as (bucket bound, count at or
    below it), cumulative; empty when the port does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return []
    return [(float(s.labels["le"]), int(s.value)) for family in text_string_to_metric_families(text)
            if family.name == name for s in family.samples if s.name.endswith("_bucket")]


def count_bindings(database: str | Path) -> int:
    """Rows in the bindings table of a state database (0 while it does not exist)."""
    import sqlite3
    if not Path(database).exists():
        return 0
    with sqlite3.connect(database, timeout=10) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM bindings").fetchone()[0])
