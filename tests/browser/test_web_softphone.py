"""The agent page is the agent's `web` device: with the edge on, lan logs in to the web app in
headless Chromium, the page registers over WSS through Kamailio as lan-web, an ACD call for
lan (all_devices) rings the page and the desk phone together, lan answers in the page, the
desk phone is cancelled, and the caller hears the page through rtpengine."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.edge.write import kamailio_binary
from router.web.softphone import JSSIP
from tests.browser.driver import CHROMIUM, Browser
from tests.integration.conftest import Lab
from tests.integration.edge import EdgeLab
from tests.integration.peers import device
from tests.integration.sippgen import invite_flow
from tests.integration.test_edge import edge_section
from tests.integration.webproc import PASSWORDS, WebProcess, web_port, with_web

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Lab, WebProcess, EdgeLab]]:
    if kamailio_binary() is None or not Path(CHROMIUM).exists() or not JSSIP.exists():
        pytest.fail("kamailio, chromium and the agent page's JsSIP are needed: run scripts/test as root")
    port = web_port()
    web_edit = with_web(port)
    lab = Lab(tmp_path, edit=lambda text: web_edit(text) + edge_section(tmp_path))
    edge = EdgeLab(lab.config, tmp_path / "edge-logs")
    web: WebProcess | None = None
    lab.router.start()
    try:
        edge.start()
        web = WebProcess(lab.config, port).start()
        yield lab, web, edge
    finally:
        if web is not None:
            web.stop()
        edge.stop()
        lab.router.stop()


def _state(page: Any) -> dict[str, Any]:
    state: dict[str, Any] = page.evaluate("window.agentPhone ? window.agentPhone.state() : {}")
    return state


def _wait(page: Any, what: str, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll the panel's state from Python (the page's CSP forbids the eval a page-side wait needs)."""
    deadline = time.monotonic() + timeout
    state = _state(page)
    while not state.get(what) and time.monotonic() < deadline:
        page.wait_for_timeout(100)
        state = _state(page)
    assert state.get(what) and check(state), f"no {what} within {timeout} s: {state}"
    return state


def test_the_agent_page_rings_for_an_all_devices_call_and_the_agent_answers_in_it(stack, tmp_path: Path) -> None:
    lab, web, _edge = stack
    desk = device(tmp_path, lab.port, "1001", "lan-desk", "desk-secret", behaviour="ring").start()
    try:
        with Browser() as browser:
            page = browser.new_context(locale="en-US", viewport={"width": 1200, "height": 1000},
                                       ignore_https_errors=True).new_page()
            page.goto(f"{web.url}/login")
            page.fill("#user", "lan")
            page.fill("#password", PASSWORDS["lan"])
            page.click("button[type=submit]")
            page.wait_for_url("**/me")
            _wait(page, "registered", lambda s: s["registered"])
            rows = {r["device"]: r for r in lab.registrations("lan")}
            assert (rows["lan-web"]["transport"], rows["lan-web"]["via"]) == ("wss", "edge")

            scenario = invite_flow(tmp_path / "caller.xml", "1001", 200, bye_after_ms=1500,
                                   headers="X-Queue: support\n")
            result: dict[str, Any] = {}
            caller = threading.Thread(target=lambda: result.update(run=lab.sipp(scenario, timeout=30)))
            caller.start()
            try:
                ringing = _wait(page, "ringing", lambda s: "0909000111" in s["caller"] and s["queue"] == "support")
                assert ringing["ringing"]
                desk.wait_received("INVITE", timeout=5)              # the desk phone rings too
                page.click("#sp-answer")
                _wait(page, "inCall", lambda s: s["inCall"])
                page.screenshot(path=str(tmp_path / "web-softphone-in-call.png"), full_page=True)
                ARTIFACTS.mkdir(exist_ok=True)
                shutil.copy(tmp_path / "web-softphone-in-call.png", ARTIFACTS / "web-softphone-in-call.png")
                _wait(page, "ended", lambda s: s["ended"], timeout=15)   # the caller's BYE
            finally:
                caller.join(45)
    finally:
        desk.stop()
    run = result["run"]
    assert run.returncode == 0, run.stdout + lab.sipp_log(scenario)
    ok = next(m for m in lab.sipp_log(scenario).split("----------------------------------------------- ")
              if "SIP/2.0 200 OK" in m and "CSeq: 1 INVITE" in m)
    assert re.search(r"m=audio \d+ RTP/AVP", ok), ok                   # the page's answer, as plain RTP
    (cancel,) = desk.wait_received("CANCEL")
    assert "Call completed elsewhere" in cancel
    (record,) = lab.calls("lan")
    assert record["answered_by"] == "lan-web"
