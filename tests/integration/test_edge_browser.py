"""A real browser softphone behind the real edge: headless Chromium running JsSIP registers
over WSS through Kamailio as lan's `web` device; lan is on all_devices, so an ACD call
rings the browser and lan's SIPp desk phone together.  The browser answers with its
(fake) microphone; rtpengine turns its DTLS-SRTP answer into plain RTP/AVP for the
caller; the desk phone is cancelled with the Reason; the caller's BYE ends the page's call.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.edge.write import kamailio_binary
from tests.browser.driver import Browser, ensure_jssip
from tests.integration.edge import EdgeLab
from tests.integration.peers import device
from tests.integration.sippgen import invite_flow
from tests.integration.test_edge import edge_section

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"      # screenshots worth looking at


@pytest.fixture
def edged(make_lab, tmp_path: Path) -> Iterator[tuple[object, EdgeLab]]:
    if kamailio_binary() is None or shutil.which("chromium") is None:
        pytest.fail("kamailio, rtpengine and chromium are needed: run scripts/test as root, which installs them")
    ensure_jssip()
    lab = make_lab(edit=lambda t: t + edge_section(tmp_path))
    edge = EdgeLab(lab.config, tmp_path / "edge-logs")
    edge.start()
    try:
        yield lab, edge
    finally:
        edge.stop()


def test_a_browser_on_all_devices_rings_with_the_desk_phone_answers_and_is_hung_up_by_the_caller(
        edged, tmp_path: Path) -> None:
    lab, edge = edged
    desk = device(tmp_path, lab.port, "1001", "lan-desk", "desk-secret", behaviour="ring").start()
    try:
        with Browser() as browser:
            phone = browser.softphone().open(
                f"wss://127.0.0.1:{edge.wss_port}", "sip:1001@pbx.test", "lan-web", "web-secret",
                display_name="Lan (web)", instance="6f1c2a4e-8d3b-4c4e-9a7f-2b6d1e0c9a11")
            phone.wait_registered(10)
            rows = {r["device"]: r for r in lab.registrations("lan")}
            lab.router.wait_for("register.ok", 2)
            assert set(rows) >= {"lan-web"}
            web = rows["lan-web"]
            assert (web["kind"], web["transport"], web["via"], web["reached_at"]) == ("web", "wss", "edge", "path")

            scenario = invite_flow(tmp_path / "caller.xml", "1001", 200, bye_after_ms=1500)
            result: dict[str, object] = {}
            caller = threading.Thread(target=lambda: result.update(run=lab.sipp(scenario, timeout=30)))
            caller.start()
            try:
                incoming = phone.wait_incoming(10)
                assert "0909000111" in str(incoming["from"])
                desk.wait_received("INVITE", timeout=5)              # both ring
                phone.answer()
                state = phone.wait_in_call(10)
                assert "UDP/TLS/RTP/SAVPF" in state["remoteSdp"] and "a=fingerprint" in state["remoteSdp"]
                phone.wait_media(10, sent=10, received=0)          # the fake microphone's RTP flows
                ARTIFACTS.mkdir(exist_ok=True)
                phone.screenshot(tmp_path / "browser-in-call.png")
                shutil.copy(tmp_path / "browser-in-call.png", ARTIFACTS / "browser-in-call.png")
                ended = phone.wait_ended(15)                       # the caller's BYE
                assert ended["endOriginator"] == "remote"
            finally:
                caller.join(45)
    finally:
        desk.stop()
    run = result["run"]
    assert run.returncode == 0, run.stdout + lab.sipp_log(scenario)
    messages = lab.sipp_log(scenario)
    ok = next(m for m in messages.split("----------------------------------------------- ")
              if "SIP/2.0 200 OK" in m and "CSeq: 1 INVITE" in m)
    media = re.search(r"m=audio (\d+) (\S+)", ok)
    assert media is not None and media.group(2) == "RTP/AVP", ok          # plain RTP for the caller
    assert 42000 <= int(media.group(1)) <= 42999, ok                      # from rtpengine's ports
    assert "ICE" not in ok and "fingerprint" not in ok
    (cancel,) = desk.wait_received("CANCEL")
    assert 'Reason: SIP;cause=200;text="Call completed elsewhere"' in cancel
    (record,) = [c for c in lab.calls("lan")]
    assert record["answered_by"] == "lan-web" and record["status"] == 200
