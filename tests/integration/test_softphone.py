"""A real softphone (baresip) registers to the real router, over UDP and over TCP."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.integration.baresip import Baresip

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def need_baresip():
    if shutil.which("baresip") is None:
        pytest.fail("baresip is not installed: run scripts/test, which installs Debian's baresip")


def wait_for_binding(lab, user, transport, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [b for b in lab.registrations(user, settle=0.2) if b["transport"] == transport]
        if found:
            return found
    return []


def test_baresip_registers_over_udp_as_the_users_app(lab, tmp_path):
    with Baresip(tmp_path / "phone", "1001", "lan-app", "app-secret", lab.port) as phone:
        bindings = wait_for_binding(lab, "lan", "udp")
        assert bindings, phone.output()
        (binding,) = bindings
        assert (binding["device"], binding["kind"]) == ("lan-app", "app")
        assert "baresip" in (binding["user_agent"] or "")
    # baresip unregisters when it stops
    deadline = time.monotonic() + 5
    while lab.registrations("lan", settle=0.2) and time.monotonic() < deadline:
        pass
    assert lab.registrations("lan") == []


def test_baresip_registers_over_tcp_when_tcp_is_enabled(make_lab, tmp_path):
    lab = make_lab(tcp=True)
    assert lab.router.events("sip.tcp.enabled"), "TCP must be announced as trusted-only"
    with Baresip(tmp_path / "phone", "1002", "minh-desk", "minh-secret", lab.port,
                 transport="tcp") as phone:
        bindings = wait_for_binding(lab, "minh", "tcp")
        assert bindings, phone.output() + lab.router.log_text()[-2000:]
        assert bindings[0]["kind"] == "ip_phone"


def test_baresip_with_a_wrong_password_is_not_registered(lab, tmp_path):
    with Baresip(tmp_path / "phone", "1002", "minh-desk", "not-it", lab.port):
        refused = lab.router.wait_for("register.auth", timeout=10)[0]
        assert refused["result"] == "bad" and "minh-desk" in refused["detail"]
        assert lab.registrations("minh") == []


def test_a_call_reaches_baresip_over_its_own_tcp_connection(make_lab, tmp_path):
    from tests.integration.sippgen import invite_flow
    lab = make_lab(tcp=True)
    with Baresip(tmp_path / "phone", "1002", "minh-desk", "minh-secret", lab.port,
                 transport="tcp") as phone:
        assert wait_for_binding(lab, "minh", "tcp"), phone.output()
        scenario = invite_flow(lab.tmp / "call.xml", "1002", 200, bye_after_ms=200)
        result = lab.sipp(scenario, timeout=15)
        assert result.returncode == 0, lab.sipp_log(scenario)[-3000:] + phone.output()
        assert phone.wait_output("Call established", timeout=5), phone.output()
        assert phone.wait_output("session closed", timeout=5), phone.output()   # the caller's BYE arrived
    (record,) = lab.calls("minh")
    assert record["answered_by"] == "minh-desk" and record["duration_s"] is not None
