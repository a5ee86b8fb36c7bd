"""The web app's pages in headless Chromium, from a click to a routed call.

The real router (the Lab), the real `sip-router web` process and SIPp phones and trunk
run on loopback.  The agent minh logs in, sees which of his devices would ring, picks
"Agent phone number" with 0987654321 and is told next to the field to type 84987654321,
fixes it and saves; after a reload the page shows it stored, and a call from the ACD
then reaches the SIPp trunk for 84987654321.  The admin lan edits minh from the staff
page; minh opening the staff page gets 403.  Screenshots of the agent page and the staff
page in English and Vietnamese are saved in the test's directory and in tests/artifacts/.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.driver import CHROMIUM, Browser
from tests.integration.calllab import CallLab
from tests.integration.conftest import Lab
from tests.integration.webproc import PASSWORDS, WebProcess, web_port, with_web

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"      # screenshots worth looking at
VIEWPORT = {"width": 1200, "height": 860}


def _names_and_no_agent_phone_for_minh(web: Callable[[str], str]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        text = text.replace('    agent_phone: "84987654321"\n', "")         # minh starts without one
        text = text.replace("  - id: lan\n", "  - id: lan\n    display_name: Nguyễn Thị Lan\n")
        text = text.replace("  - id: minh\n", "  - id: minh\n    display_name: Trần Văn Minh\n")
        return web(text)
    return edit


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Lab, WebProcess, CallLab]]:
    if shutil.which("sipp") is None or not Path(CHROMIUM).exists():
        pytest.fail("sipp and chromium are needed: run scripts/test as root, which installs them")
    port = web_port()
    lab = Lab(tmp_path, edit=_names_and_no_agent_phone_for_minh(with_web(port)))
    calls = CallLab(lab)
    web: WebProcess | None = None
    lab.router.start()
    try:
        web = WebProcess(lab.config, port).start()
        yield lab, web, calls
    finally:
        calls.stop()
        if web is not None:
            web.stop()
        lab.router.stop()


def log_in(browser: Browser, web: WebProcess, user: str) -> Any:
    page = browser.new_context(locale="en-US", viewport=VIEWPORT).new_page()
    page.goto(f"{web.url}/login")
    page.fill("#user", user)
    page.fill("#password", PASSWORDS[user])
    page.click("button[type=submit]")
    page.wait_for_url("**/me")
    return page


def shoot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def switch_language(page: Any, label: str) -> None:
    page.click(f".langs a:has-text('{label}')")
    page.wait_for_load_state()


def test_an_agent_sets_their_phone_in_the_page_the_call_reaches_the_trunk_and_the_admin_edits_staff(
        stack: tuple[Lab, WebProcess, CallLab], tmp_path: Path) -> None:
    lab, web, calls = stack
    calls.phone("minh-desk", "ring")
    calls.phone("lan-desk", "ring")
    calls.phone("lan-app", "ring")
    pstn = calls.trunk("answer")

    with Browser() as browser:
        agent = log_in(browser, web, "minh")
        # what would ring right now: the registered desk phone; the app is not logged in
        desk = agent.locator('#devices li[data-device="minh-desk"]')
        assert desk.get_attribute("data-rings") == "yes" and "Rings" in desk.inner_text()
        app = agent.locator('#devices li[data-device="minh-app"]')
        assert app.get_attribute("data-rings") == "no" and "not logged in" in app.inner_text()
        assert "ring together" in agent.inner_text("#preview-summary")

        # agent_phone with the number as people write it: refused next to the field, with what to type
        agent.click('label[for="method-agent_phone"]')
        assert agent.is_checked("#method-agent_phone")
        agent.fill("#agent_phone", "0987654321")
        agent.click("#settings-form button[type=submit]")
        error = agent.locator(".field:has(#agent_phone) #agent_phone-error")
        error.wait_for()
        assert "84987654321" in error.inner_text()
        assert agent.get_attribute("#agent_phone", "aria-invalid") == "true"
        assert agent.input_value("#agent_phone") == "0987654321" and agent.is_checked("#method-agent_phone")
        assert lab.cli("audit") == []
        shoot(agent, tmp_path, "web-agent-error-en.png")

        # fixed and saved: the result shows at once, and again after a reload
        agent.fill("#agent_phone", "84987654321")
        agent.click("#settings-form button[type=submit]")
        agent.wait_for_url("**/me?saved=1")
        assert "Agent phone number" in agent.inner_text("#flash")
        agent.goto(f"{web.url}/me")
        assert agent.is_checked("#method-agent_phone") and agent.input_value("#agent_phone") == "84987654321"
        summary = agent.inner_text("#preview-summary")
        assert "84987654321" in summary and "842873001234" in summary
        assert "your phone is called instead" in desk.inner_text()
        audit = lab.cli("audit", "minh")
        assert [(e["field"], e["new"], e["by"], e["via"]) for e in reversed(audit)] == [  # type: ignore[index]
            ("agent_phone", "84987654321", "minh", "api"), ("receive_method", "agent_phone", "minh", "api")]
        shoot(agent, tmp_path, "web-agent-en.png")
        switch_language(agent, "Tiếng Việt")
        assert agent.get_attribute("html", "lang") == "vi"
        assert "Số điện thoại của Agent" in agent.inner_text("#settings-form")
        shoot(agent, tmp_path, "web-agent-vi.png")

        # the router picked the change up: the ACD's call goes to the trunk for the agent's number
        lab.router.wait_for("policy.runtime_change", timeout=5)
        result, log = calls.call("1002", 200, headers="X-Queue: support\n")
        assert result.returncode == 0, log
        (invite,) = pstn.received("INVITE")
        assert invite.startswith(f"INVITE sip:84987654321@127.0.0.1:{lab.trunk_port} SIP/2.0")
        assert "P-Asserted-Identity: <sip:842873001234@127.0.0.1>" in invite
        assert calls.peers[0].received("INVITE") == []            # minh's desk phone did not ring

        # an agent is not an admin
        refused = agent.goto(f"{web.url}/staff")
        assert refused is not None and refused.status == 403
        assert "Chỉ dành cho quản trị viên" in agent.inner_text("main")
        assert agent.goto(f"{web.url}/staff/lan").status == 403

        # the admin: the staff list, a filter, and an edit of another user
        admin = log_in(browser, web, "lan")
        admin.goto(f"{web.url}/staff")
        minh_row = admin.locator('#staff tr[data-user="minh"]')
        assert "Agent phone number" in minh_row.inner_text() and "runtime" in minh_row.inner_text().lower()
        lan_row = admin.locator('#staff tr[data-user="lan"]').inner_text()
        assert "lan-desk" in lan_row and "lan-app" in lan_row
        shoot(admin, tmp_path, "web-staff-en.png")
        switch_language(admin, "Tiếng Việt")
        assert "Quản lý nhân sự" in admin.inner_text("h1")
        shoot(admin, tmp_path, "web-staff-vi.png")
        switch_language(admin, "English")

        admin.select_option("#method", "agent_phone")
        admin.click("form.filters button[type=submit]")
        admin.wait_for_url("**/staff?*method=agent_phone*")
        assert [r.get_attribute("data-user") for r in admin.locator("#staff tbody tr").all()] == ["minh"]

        admin.click('#staff tr[data-user="minh"] a:has-text("Edit")')
        admin.wait_for_url("**/staff/minh")
        admin.click('label[for="method-ip_phone"]')
        admin.click("#settings-form button[type=submit]")
        admin.wait_for_url("**/staff/minh?saved=1")
        assert "Trần Văn Minh" in admin.inner_text("#flash") and "IP Phone" in admin.inner_text("#flash")
        newest = lab.cli("audit", "minh")[0]  # type: ignore[index]
        assert (newest["old"], newest["new"], newest["by"], newest["via"]) == ("agent_phone", "ip_phone", "lan", "api")

        admin.goto(f"{web.url}/audit?via=api&actor=lan")
        assert admin.locator("#audit tbody tr").count() == 1
        admin.goto(f"{web.url}/calls")
        assert "pstn:84987654321" in admin.inner_text("main")
        shoot(admin, tmp_path, "web-calls-en.png")
