"""The router process: signals, reload, start-up failures, and the operator's view."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.integration.rawsip import UdpPeer
from tests.support import ROOT

pytestmark = pytest.mark.integration


def test_sigterm_stops_the_router_cleanly_and_quickly(lab):
    started = time.monotonic()
    assert lab.router.stop() == 0
    assert time.monotonic() - started < 3
    (stopped,) = lab.router.events("router.stopped")
    busy = stopped["loop_busy"]                 # how long the SIP loop's passes took, for finding stalls
    assert busy["count"] > 0 and busy["max_le"] is not None
    assert "count" in stopped["message_delay"]   # arrival to sends, per pass that read a datagram


def test_sighup_with_a_broken_file_keeps_the_last_good_policy_and_the_registrations(lab):
    with UdpPeer(lab.port) as phone:
        assert phone.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
    good = lab.config.read_text()
    lab.config.write_text(good.replace('agent_phone: "84987654321"', 'agent_phone: "0987654321"'))
    lab.router.signal(signal.SIGHUP)
    (refused,) = lab.router.wait_for("policy.reload.refused")
    assert any(e.startswith(f"{lab.config}:") and "write it as 84987654321" in e for e in refused["errors"])
    with UdpPeer(lab.port) as phone:          # still serving on the old policy, binding intact
        reply = phone.register_with("MD5", "1002", "minh-desk", "minh-secret")
    assert reply.status == 200 and len(reply.all("contact")) == 2


def test_sighup_with_a_good_file_applies_it_without_a_restart(lab):
    with UdpPeer(lab.port) as phone:
        assert phone.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
    lab.config.write_text(lab.config.read_text().replace(
        "      - {id: minh-desk, kind: ip_phone, username: minh-desk, password: minh-secret}",
        "      - {id: minh-desk, kind: ip_phone, username: minh-desk, password: minh-secret}\n"
        "      - {id: minh-tab, kind: app, username: minh-tab, password: tab-secret}"))
    lab.router.signal(signal.SIGHUP)
    lab.router.wait_for("policy.reloaded")
    with UdpPeer(lab.port) as tablet:
        assert tablet.register_with("MD5", "1002", "minh-tab", "tab-secret").status == 200
    assert {b["device"] for b in lab.registrations("minh")} == {"minh-desk", "minh-tab"}


def test_a_port_in_use_is_a_clear_start_failure(lab):
    second = subprocess.run([sys.executable, "-m", "router", "-c", str(lab.config), "run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert "router.start.failed" in second.stderr and "Address already in use" in second.stderr


def test_a_broken_config_refuses_to_start_with_file_and_line(lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(lab.config.read_text().replace("kind: app", "kind: tablet"))
    out = subprocess.run([sys.executable, "-m", "router", "-c", str(bad), "run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert f"{bad}:" in out.stderr and "'tablet' is not one of: web, app, ip_phone" in out.stderr


def test_explain_uses_the_live_registrations(lab):
    before = lab.cli("explain", "lan")
    assert before["action"] == "reject"
    with UdpPeer(lab.port) as phone:
        assert phone.register_with("MD5", "1001", "lan-desk", "desk-secret").status == 200
    time.sleep(0.3)
    after = lab.cli("explain", "lan")
    assert after["action"] == "fork"
    assert [t.split()[0] for t in after["targets"]] == ["lan-desk"]


def test_registrations_lists_device_kind_source_and_transport(lab):
    with UdpPeer(lab.port) as phone:
        assert phone.register_with("MD5", "1001", "lan-app", "app-secret").status == 200
        (row,) = lab.registrations("lan")
    assert (row["device"], row["kind"], row["transport"]) == ("lan-app", "app", "udp")
    assert row["source"] == f"127.0.0.1:{phone.port}"
