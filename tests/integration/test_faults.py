"""Faults, against the real router process on loopback: kill -9, silent peers, a broken
config on SIGHUP, and a state database that cannot be opened or written.

Every process a test starts is stopped by its PID in a ``finally``, also when the test
fails; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.calllab import CallLab
from tests.integration.conftest import Lab
from tests.integration.peers import SilentUdp
from tests.integration.rawsip import UdpPeer
from tests.integration.sippgen import invite_flow
from tests.support import ROOT, RegisterBurst, RouterProcess, free_port, write_users_config

pytestmark = pytest.mark.integration


def stored_devices(config: str) -> set[str]:
    """The devices ``sip-router registrations --json`` lists."""
    out = subprocess.run([sys.executable, "-m", "router", "-c", config, "--json", "registrations"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {row["device"] for row in json.loads(out.stdout)}


# --------------------------------------------------------------------------- 1. kill -9

def test_every_registration_acknowledged_before_a_kill_9_is_there_after_the_restart(tmp_path):
    users = 3000
    port = free_port()
    config, _ = write_users_config(str(tmp_path), port, users)
    router = RouterProcess(config, port)
    router.start()
    killed_at: list[int] = []

    def kill_mid_burst(acked: int) -> None:
        if acked >= users // 3 and not killed_at:
            router.proc.kill()                  # SIGKILL, while hundreds are in flight
            killed_at.append(acked)
    try:
        with RegisterBurst(port, users, window=300) as burst:
            burst.run(kill_mid_burst, quiet=3.0, deadline=90)
            acked = set(burst.acked)
    finally:
        router.stop()
    assert killed_at, f"the burst ended before the kill: {len(acked)} acknowledged"
    assert 0 < len(acked) < users
    restarted = RouterProcess(config, port)
    try:
        restarted.start()
        stored = stored_devices(config)
    finally:
        restarted.stop()
    missing = acked - stored
    print(f"\nkill -9 after {killed_at[0]} acknowledgements: {len(acked)} acknowledged in all "
          f"(200s already on the wire), {len(stored)} stored after the restart, "
          f"{len(missing)} acknowledged but lost")
    assert not missing, f"{len(missing)} registrations got a 200 but were lost: {sorted(missing)[:20]}"


# --------------------------------------------------------------------------- a world of phones

RING_TIMEOUT = 3.0
MARGIN = 3.0          # a loaded 2-core machine; Timer B (32 s) and Timer C (180 s) are far beyond it
MINH = '    receive_method: ip_phone\n    agent_phone: "84987654321"\n'


def minh(method: str, ring_timeout: float, fallback: str):
    """An edit of the lab's YAML: minh's receive method, ring timeout and fallback."""
    def edit(text: str) -> str:
        assert MINH in text
        return text.replace(MINH, f'    receive_method: {method}\n    agent_phone: "84987654321"\n'
                                  f"    ring_timeout: {ring_timeout:g}\n    fallback: {fallback}\n")
    return edit


def answer_seconds(log: str) -> float:
    """From SIPp's message log: the first INVITE sent to the first final response received."""
    sent = answered = None
    for chunk in log.split("----------------------------------------------- ")[1:]:
        head, _, rest = chunk.partition("\n")
        kind, _, message = rest.partition("\n")
        message = message.lstrip()
        try:
            stamp = datetime.strptime(head.strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        if sent is None and "sent" in kind and message.startswith("INVITE "):
            sent = stamp
        elif sent is not None and "received" in kind and re.match(r"SIP/2\.0 [2-6]\d\d ", message):
            answered = stamp
            break
    assert sent is not None and answered is not None, log[-3000:]
    return answered - sent


class World(CallLab):
    """The call lab, with silent peers and callers in the background; all stopped by PID in ``stop``."""

    register_timeout = 15.0
    call_timeout = 30.0

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.callers: list[subprocess.Popen[str]] = []

    def silent_trunk(self, provisional: bool = False) -> SilentUdp:
        peer = SilentUdp(self.lab.trunk_port, provisional)
        self.peers.append(peer.start())
        return peer

    def start_callers(self, name: str, user: str, expect: int, calls: int, timeout: float = 40.0,
                      **kwargs: object) -> tuple[subprocess.Popen[str], Path]:
        """``calls`` calls placed at once by one SIPp in the background."""
        scenario = invite_flow(self.lab.tmp / f"{name}.xml", user, expect, **kwargs)  # type: ignore[arg-type]
        cmd = ["sipp", "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(free_port()),
               "-m", str(calls), "-l", str(calls), "-r", str(max(calls, 1)), "-nostdin", "-t", "u1",
               "-timeout", str(int(timeout)), "-timeout_error", "-trace_err", "-trace_msg",
               f"127.0.0.1:{self.lab.port}"]
        proc = subprocess.Popen(cmd, cwd=self.lab.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        self.callers.append(proc)
        return proc, scenario

    def stop(self) -> None:
        for proc in self.callers:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=5)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        super().stop()


@pytest.fixture
def make_world(make_lab) -> Iterator[object]:
    worlds: list[World] = []

    def make(**kwargs: object) -> World:
        world = World(make_lab(**kwargs))
        worlds.append(world)
        return world
    try:
        yield make
    finally:
        for world in worlds:
            world.stop()


# --------------------------------------------------------------------------- 2. a trunk that does not answer

def test_a_silent_trunk_gives_way_to_the_fallback_at_the_ring_timeout(make_world):
    world = make_world(edit=minh("agent_phone", RING_TIMEOUT, "[ip_phone]"))
    pstn = world.silent_trunk()
    desk = world.phone("minh-desk", "answer")
    result, log = world.call("1002", 200)
    assert result.returncode == 0, log
    seconds = answer_seconds(log)
    print(f"\nsilent trunk, fallback ip_phone: answered by the desk phone after {seconds:.2f} s "
          f"(ring timeout {RING_TIMEOUT:g} s, Timer B 32 s)")
    assert RING_TIMEOUT - 0.2 <= seconds <= RING_TIMEOUT + MARGIN
    invites = pstn.received("INVITE")
    assert invites and invites[0][1].startswith(b"INVITE sip:84987654321@")
    assert len(desk.received("INVITE")) == 1
    (record,) = world.lab.calls("minh")
    assert record["method"] == "agent_phone>ip_phone" and record["answered_by"] == "minh-desk"


def test_a_trunk_that_accepts_and_never_rings_is_cancelled_and_the_caller_gets_480(make_world):
    world = make_world(edit=minh("agent_phone", RING_TIMEOUT, "[]"))
    pstn = world.silent_trunk(provisional=True)
    result, log = world.call("1002", 480)
    assert result.returncode == 0, log
    seconds = answer_seconds(log)
    print(f"\ntrunk answers 100 and nothing more, no fallback: 480 after {seconds:.2f} s")
    assert RING_TIMEOUT - 0.2 <= seconds <= RING_TIMEOUT + MARGIN
    deadline = time.monotonic() + 5
    while not pstn.received("CANCEL") and time.monotonic() < deadline:
        time.sleep(0.05)
    (cancel,) = pstn.received("CANCEL")[:1]
    assert b"Ring timeout" in cancel[1]
    (record,) = world.lab.calls("minh")
    assert record["status"] == 480


def test_a_silent_trunk_with_a_ring_timeout_beyond_timer_b_fails_408_and_falls_back(make_world):
    """README: the ring timeout bounds the wait, and a branch failing with 408 also moves on to
    the fallback.  A ring timeout longer than Timer B (64*T1 = 32 s) is cut short by Timer B."""
    world = make_world(edit=minh("agent_phone", 45, "[ip_phone]"))
    pstn = world.silent_trunk()
    desk = world.phone("minh-desk", "answer")
    result, log = world.call("1002", 200, timeout=60)
    assert result.returncode == 0, log
    seconds = answer_seconds(log)
    print(f"\nsilent trunk, ring timeout 45 s: Timer B ended it, fallback answered after {seconds:.2f} s")
    assert 31.5 <= seconds <= 32 + MARGIN
    assert len(pstn.received("INVITE")) >= 5            # Timer A retransmissions until Timer B
    assert len(desk.received("INVITE")) == 1
    (record,) = world.lab.calls("minh")
    assert record["method"] == "agent_phone>ip_phone" and record["answered_by"] == "minh-desk"


# --------------------------------------------------------------------------- 3. a phone that vanishes

def test_a_phone_killed_while_ringing_does_not_hold_the_call_the_fallback_rings(make_world):
    world = make_world(edit=minh("ip_phone", RING_TIMEOUT, "[agent_phone]"))
    pstn = world.trunk("answer")
    desk = world.phone("minh-desk", "ring")
    proc, scenario = world.start_callers("vanish", "1002", 200, calls=1)
    assert desk.wait_received("INVITE", timeout=10), desk.messages()[-2000:]
    desk.stop()                                    # kill -9 mid-ring: no CANCEL answered, no 487
    out, _ = proc.communicate(timeout=45)
    log = world.lab.sipp_log(scenario)
    assert proc.returncode == 0, out[-2000:] + log[-3000:]
    seconds = answer_seconds(log)
    print(f"\nphone killed mid-ring: the fallback (trunk) answered after {seconds:.2f} s")
    assert RING_TIMEOUT - 0.2 <= seconds <= RING_TIMEOUT + MARGIN
    assert pstn.received("INVITE")
    (record,) = world.lab.calls("minh")
    assert record["method"] == "ip_phone>agent_phone" and record["answered_by"] == "pstn:84987654321"


def test_a_registered_phone_that_never_answers_an_invite_gets_the_caller_480_at_the_ring_timeout(make_world):
    world = make_world(edit=minh("ip_phone", RING_TIMEOUT, "[]"))
    with UdpPeer(world.lab.port) as ghost:        # registers, then never reads again
        assert ghost.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
        result, log = world.call("1002", 480)
    assert result.returncode == 0, log
    seconds = answer_seconds(log)
    print(f"\nphone registered then silent, no fallback: 480 after {seconds:.2f} s")
    assert RING_TIMEOUT - 0.2 <= seconds <= RING_TIMEOUT + MARGIN
    (record,) = world.lab.calls("minh")
    assert record["status"] == 480 and record["branches"] == "minh-desk"


# --------------------------------------------------------------------------- 4. garbage YAML on SIGHUP

GARBAGE = {
    "yaml-syntax": b"users: [\n  {id: x, ::: ]\n}}} {{{\n",
    "binary": bytes(range(128, 256)) * 8,
    "control-characters": b"domain: pbx.test\nusers:\x00\x01\x02 []\n",
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_yaml_on_sighup_during_calls_changes_nothing(make_world, kind):
    world = make_world()
    desk = world.phone("minh-desk", "answer", answer_delay_ms=4000)
    proc, scenario = world.start_callers("during", "1002", 200, calls=3, bye_after_ms=300)
    assert len(desk.wait_received("INVITE", 3, timeout=10)) == 3, desk.messages()[-2000:]
    config = world.lab.config
    good = config.read_bytes()
    config.write_bytes(GARBAGE[kind])
    world.lab.router.signal(signal.SIGHUP)
    (refused,) = world.lab.router.wait_for("policy.reload.refused", timeout=10)
    assert world.lab.router.proc.poll() is None, world.lab.router.log_text()[-3000:]
    errors = refused["errors"]
    assert errors and all(str(e).startswith(f"{config}:") for e in errors), errors
    if kind == "yaml-syntax":
        assert any(re.match(rf"{re.escape(str(config))}:\d+(:\d+)?: ", str(e)) for e in errors), errors
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:] + world.lab.sipp_log(scenario)[-3000:]
    assert "policy.reloaded" not in world.lab.router.log_text()
    result, log = world.call("1002", 200, name="after")
    assert result.returncode == 0, log
    assert len(desk.received("INVITE")) == 4
    config.write_bytes(good)                      # the CLI reads the file too (no SIGHUP: no reload)
    records = world.lab.calls("minh")
    assert len(records) == 4 and all(r["answered_by"] == "minh-desk" for r in records)


@pytest.mark.parametrize("kind", ["binary", "control-characters"])
def test_a_binary_yaml_is_refused_with_file_and_line(lab, kind):
    lab.config.write_bytes(GARBAGE[kind])
    lab.router.signal(signal.SIGHUP)
    (refused,) = lab.router.wait_for("policy.reload.refused", timeout=10)
    assert any(re.match(rf"{re.escape(str(lab.config))}:\d+(:\d+)?: ", str(e)) for e in refused["errors"]), refused
    out = subprocess.run([sys.executable, "-m", "router", "-c", str(lab.config), "check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert re.search(rf"{re.escape(str(lab.config))}:\d+(:\d+)?: ", out.stderr), out.stderr


# --------------------------------------------------------------------------- 5. the state database

@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i``: not even root may write (tests run as root, so chmod would not do);
    undone in ``finally``.  Skips where the file system has no such attribute."""
    done: list[Path] = []
    try:
        for path in paths:
            out = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, timeout=10)
            if out.returncode != 0:
                pytest.skip(f"chattr +i is not available here: {out.stderr.strip()}")
            done.append(path)
        yield
    finally:
        for path in reversed(done):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, timeout=10)


def start_router(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "-c", str(config), "run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def break_garbage(state: Path) -> tuple[Path, str]:
    state.mkdir()
    (state / "router.db").write_bytes(b"this is not a database, just some bytes\n" * 200)
    return state / "router.db", "file is not a database"


def break_directory(state: Path) -> tuple[Path, str]:
    (state / "router.db").mkdir(parents=True)
    return state / "router.db", "is a directory"


def break_state_dir(state: Path) -> tuple[Path, str]:
    state.write_text("a file where the state directory should be\n")
    return state / "router.db", "File exists"


@pytest.mark.parametrize("breakage", [break_garbage, break_directory, break_state_dir],
                         ids=["garbage-file", "directory", "state-dir-is-a-file"])
def test_an_unusable_state_database_is_one_clear_error_at_start(make_lab, breakage):
    lab = make_lab(start=False)
    database, reason = breakage(lab.tmp / "state")
    out = start_router(lab.config)
    assert_start_refused(out, database, reason)


def test_a_read_only_state_directory_is_one_clear_error_at_start(make_lab):
    lab = make_lab(start=False)
    state = lab.tmp / "state"
    state.mkdir()
    with immutable(state):
        out = start_router(lab.config)
    assert_start_refused(out, state / "router.db", "unable to open database file")


def test_a_read_only_state_database_is_one_clear_error_at_start(make_lab):
    lab = make_lab(start=False)
    state = lab.tmp / "state"
    state.mkdir()
    sqlite3.connect(state / "router.db").close()              # an empty, valid database
    with immutable(state / "router.db"):
        out = start_router(lab.config)
    assert_start_refused(out, state / "router.db", "readonly database")


def assert_start_refused(out: subprocess.CompletedProcess[str], database: Path, reason: str) -> None:
    assert out.returncode == 4, (out.returncode, out.stderr[-3000:])         # 2 is a bad config, 1 a port
    assert "Traceback" not in out.stderr, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    (failed,) = [e for e in lines if e.get("event") == "router.start.failed"]
    assert failed["database"] == str(database) and reason in failed["reason"], failed
    assert not [e for e in lines if e.get("event") == "router.started"]


def test_a_running_router_keeps_routing_when_the_database_becomes_unwritable(make_world):
    world = make_world()
    lab = world.lab
    world.phone("minh-desk", "answer")
    database = lab.tmp / "state" / "router.db"
    wal = database.with_name("router.db-wal")
    assert wal.exists()
    with immutable(database, wal):
        with UdpPeer(lab.port) as app, UdpPeer(lab.port) as web:
            refused = [app.register_with("MD5", "1001", "lan-app", "app-secret"),
                       web.register_with("MD5", "1001", "lan-web", "web-secret")]
        for reply in refused:                 # not stored, so not acknowledged
            assert reply.status == 500 and reply.header("retry-after"), reply
        result, log = world.call("1002", 200, name="during")
        assert result.returncode == 0, log   # calls are still routed
        assert lab.router.proc.poll() is None
        failed = lab.router.wait_for("state.write.failed", timeout=5)
        time.sleep(1.5)                       # retries go on, the log does not
        assert len(lab.router.events("state.write.failed")) == 1, failed
        assert failed[0]["level"] == "error" and failed[0]["error"], failed
    lab.router.wait_for("state.write.recovered", timeout=10)
    stored = {b["device"] for b in lab.registrations()}
    assert {"minh-desk", "lan-app", "lan-web"} <= stored       # kept for retry, written now
    assert [r["status"] for r in lab.calls("minh")] == [200]
    with UdpPeer(lab.port) as app:
        assert app.register_with("MD5", "1001", "lan-app", "app-secret").status == 200
    assert "Traceback" not in lab.router.log_text()


def test_a_database_locked_by_another_writer_delays_nothing_for_long_and_loses_nothing(lab):
    """An operator's sqlite3 shell left inside a write transaction: the router waits at
    most 20 ms per attempt and a second in all, answers 500 rather than acknowledge an
    unstored binding, and writes it when the lock goes."""
    other = sqlite3.connect(lab.tmp / "state" / "router.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with UdpPeer(lab.port) as phone:
            started = time.monotonic()
            reply = phone.register_with("MD5", "1002", "minh-desk", "minh-secret")
            waited = time.monotonic() - started
        assert reply.status == 500 and reply.header("retry-after") == "10", reply
        assert waited < 3.0
        failed = lab.router.wait_for("state.write.failed", timeout=5)
        assert "locked" in str(failed[0]["error"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    lab.router.wait_for("state.write.recovered", timeout=10)
    assert [b["device"] for b in lab.registrations("minh")] == ["minh-desk"]
