"""The router's logs as the journal gets them: a priority on every line, the run-time
changes with who changed what, and socket errors with their address."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from router.log import is_journal
from tests.integration.conftest import Lab
from tests.integration.rawsip import UdpPeer
from tests.support import ROOT

pytestmark = pytest.mark.integration


def journal_lines(lab: Lab) -> list[tuple[int, dict[str, object]]]:
    """Each ``<N>{json}`` line of the router's output as (priority, entry)."""
    out = []
    for line in lab.router.log_text().splitlines():
        assert line.startswith("<") and line[2:4] == ">{", f"no priority prefix: {line[:120]}"
        out.append((int(line[1]), json.loads(line[3:])))
    return out


def wait_line(lab: Lab, event: str, timeout: float = 5.0) -> list[tuple[int, dict[str, object]]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [(p, e) for p, e in journal_lines(lab) if e.get("event") == event]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {event} in the router's output:\n{lab.router.log_text()[-3000:]}")


def as_journal(lab: Lab) -> None:
    """Make the router's output file the "journal": JOURNAL_STREAM names its device and inode."""
    lab.router.log_path.touch()
    st = os.stat(lab.router.log_path)
    lab.router.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_every_line_carries_its_journal_priority_and_socket_errors_name_the_address(make_lab):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    metrics_port = busy.getsockname()[1]
    try:
        lab = make_lab(start=False, edit=lambda t: t + f"metrics: {{port: {metrics_port}}}\n")
        as_journal(lab)
        lab.router.start()
        with UdpPeer(lab.port) as guesser:            # a wrong password is a warning
            assert guesser.register_with("MD5", "1001", "lan-desk", "wrong").status == 401
        (priority, failed), = wait_line(lab, "metrics.listen.failed")
        assert priority == 3 and failed["level"] == "error"
        assert (failed["address"], failed["port"]) == ("127.0.0.1", metrics_port)
        assert "in use" in str(failed["detail"])
        (warning, bad), = wait_line(lab, "register.auth")
        assert warning == 4 and bad["result"] == "bad"
        (info, _), = wait_line(lab, "router.started")
        assert info == 6
        with UdpPeer(lab.port) as phone:               # and the router routes on without its metrics
            assert phone.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
    finally:
        busy.close()


def test_a_port_in_use_at_start_is_logged_with_its_address_and_port(lab):
    second = subprocess.run([sys.executable, "-m", "router", "-c", str(lab.config), "run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    (failed,) = [e for e in map(json.loads, second.stderr.splitlines()) if e["event"] == "router.start.failed"]
    assert (failed["address"], failed["port"], failed["transport"]) == ("127.0.0.1", lab.port, "udp")
    assert "Address already in use" in str(failed["detail"])


def test_a_run_time_change_is_logged_with_user_field_old_new_actor_and_via(make_lab):
    lab = make_lab(start=False)
    as_journal(lab)
    lab.router.start()
    lab.cli("set-method", "lan", "ip_phone", "--as", "lan")
    (priority, change), = wait_line(lab, "policy.runtime_change")
    assert priority == 6
    assert {k: change[k] for k in ("user", "field", "old", "new", "actor", "via")} == {
        "user": "lan", "field": "receive_method", "old": "all_devices", "new": "ip_phone",
        "actor": "lan", "via": "cli"}
    out = subprocess.run([sys.executable, "-m", "router", "-c", str(lab.config), "set-password", "minh",
                          "--as", "lan"], cwd=ROOT, input="a long enough passphrase 42\n",
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 5
    while len(changes := [e for _, e in journal_lines(lab) if e.get("event") == "policy.runtime_change"]) < 2:
        assert time.monotonic() < deadline, lab.router.log_text()[-2000:]
        time.sleep(0.1)
    password = changes[1]
    assert (password["user"], password["field"], password["actor"]) == ("minh", "password_hash", "lan")
    assert password["old"] is None and password["new"] == "(set)"     # never the hash
    assert "$argon2" not in lab.router.log_text()


def test_the_priority_prefix_is_only_for_the_journal_stream_itself(tmp_path: Path):
    with open(tmp_path / "out.log", "w") as out:
        st = os.fstat(out.fileno())
        assert is_journal(out, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not is_journal(out, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})   # inherited, elsewhere
        assert not is_journal(out, {})
        assert not is_journal(out, {"JOURNAL_STREAM": "garbage"})


def test_no_prefix_when_the_output_is_not_the_journal(make_lab):
    lab = make_lab(start=False)
    lab.router.env = {"JOURNAL_STREAM": "1:1"}        # inherited from a unit, output elsewhere
    lab.router.start()
    lab.router.wait_for("router.started")             # plain JSON lines, as before
    assert not [line for line in lab.router.log_text().splitlines() if line.startswith("<")]
