"""The web app's JSON API over real HTTP: a real `sip-router web` process beside the real
router (the Lab), both on loopback and stopped by PID.  Every change is checked where
an operator would look: `sip-router audit`, `sip-router users`, and the router itself.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from router.edge.certs import ensure_self_signed
from tests.integration.calllab import CallLab
from tests.integration.conftest import Lab
from tests.integration.webproc import PASSWORDS, WebProcess, web_port, with_web
from tests.support import ROOT

pytestmark = pytest.mark.integration

ENDPOINTS = {
    "/api/login": {"post"}, "/api/logout": {"post"}, "/api/me": {"get"}, "/api/me/receive-method": {"put"},
    "/api/me/password": {"put"}, "/api/users": {"get"}, "/api/users/{user_id}/receive-method": {"get", "put"},
    "/api/registrations": {"get"}, "/api/calls": {"get"}, "/api/audit": {"get"},
}


class World:
    def __init__(self, lab: Lab, web: WebProcess) -> None:
        self.lab = lab
        self.web = web
        self.clients: list[httpx.Client] = []

    def client(self, token: str | None = None, source: str | None = None) -> httpx.Client:
        """``source``: the loopback address the client connects from (another "machine")."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(local_address=source) if source else None
        client = httpx.Client(base_url=self.web.url, headers=headers, timeout=10, follow_redirects=False,
                              transport=transport)
        self.clients.append(client)
        return client

    def login(self, user: str, password: str | None = None) -> httpx.Client:
        reply = self.client().post("/api/login", json={"user": user, "password": password or PASSWORDS[user]})
        assert reply.status_code == 200, reply.text
        return self.client(reply.json()["token"])

    def audit(self, user: str | None = None) -> list[dict[str, object]]:
        return self.lab.cli("audit", *([user] if user else []))  # type: ignore[return-value]

    def user(self, user_id: str) -> dict[str, object]:
        rows = self.lab.cli("users")
        assert isinstance(rows, list)
        return next(r for r in rows if r["user"] == user_id)

    def close(self) -> None:
        for client in self.clients:
            client.close()


def start_world(make_lab, **limits: int) -> Iterator[World]:
    port = web_port()
    lab = make_lab(edit=with_web(port, **limits))
    web = WebProcess(lab.config, port).start()
    world = World(lab, web)
    try:
        yield world
    finally:
        world.close()
        web.stop()


@pytest.fixture
def world(make_lab) -> Iterator[World]:
    yield from start_world(make_lab)


@pytest.fixture
def strict_world(make_lab) -> Iterator[World]:
    """Tight login throttles: 3 bad passwords per user per 15 minutes, 6 per address per minute."""
    yield from start_world(make_lab, max_login_failures=3, address_failures_per_minute=6)


def test_the_openapi_document_lists_every_endpoint_and_the_docs_page_loads(world: World) -> None:
    client = world.client()
    paths = client.get("/openapi.json").json()["paths"]
    for path, methods in ENDPOINTS.items():
        assert path in paths, f"{path} missing from the OpenAPI document"
        assert methods <= set(paths[path]), (path, set(paths[path]))
    assert "422" in paths["/api/me/receive-method"]["put"]["responses"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_without_an_identity_every_endpoint_is_401(world: World) -> None:
    anonymous = world.client()
    for path, methods in ENDPOINTS.items():
        if path in ("/api/login",):
            continue
        for method in methods:
            url = path.replace("{user_id}", "minh")
            reply = anonymous.request(method.upper(), url, json={"method": "app"})
            assert reply.status_code == 401, (method, url, reply.text)
            assert "POST /api/login" in reply.json()["error"]
    forged = world.client("not-a-real-token")
    assert forged.get("/api/me").status_code == 401
    assert world.audit() == []


def test_an_admin_changes_anyone_and_the_router_routes_by_it(world: World) -> None:
    calls = CallLab(world.lab)
    try:
        pstn = calls.trunk("answer")
        lan = world.login("lan")
        assert {u["id"] for u in lan.get("/api/users").json()} == {"lan", "minh"}
        reply = lan.put("/api/users/minh/receive-method", json={"method": "agent_phone"})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert (body["receive_method"], body["receive_method_source"]) == ("agent_phone", "runtime")
        assert body["would_ring"]["action"] == "phone" and body["would_ring"]["number"] == "84987654321"
        (change,) = body["changes"]
        assert (change["old"], change["new"], change["by"], change["via"]) == ("ip_phone", "agent_phone", "lan", "api")

        (entry,) = world.audit("minh")
        assert (entry["field"], entry["old"], entry["new"], entry["by"], entry["via"]) == (
            "receive_method", "ip_phone", "agent_phone", "lan", "api")
        assert (world.user("minh")["method"], world.user("minh")["source"]) == ("agent_phone", "runtime")

        # the router picks the change up through the database and the next call follows it
        world.lab.router.wait_for("policy.runtime_change", timeout=5)
        result, log = calls.call("1002", 200, headers="X-Queue: support\n")
        assert result.returncode == 0, log
        (invite,) = pstn.received("INVITE")
        assert invite.startswith(f"INVITE sip:84987654321@127.0.0.1:{world.lab.trunk_port} SIP/2.0")

        # and the admin can change their own too, with the same call
        assert lan.put("/api/me/receive-method", json={"method": "app"}).status_code == 200
        assert world.audit("lan")[0]["by"] == "lan"
    finally:
        calls.stop()


def test_an_agent_changes_only_themself_and_a_refusal_writes_nothing(world: World) -> None:
    minh = world.login("minh")
    refused = minh.put("/api/users/lan/receive-method", json={"method": "ip_phone"})
    assert refused.status_code == 403
    assert "minh is an agent and may change only their own settings" in refused.json()["error"]
    assert world.audit() == []
    assert (world.user("lan")["method"], world.user("lan")["source"]) == ("all_devices", "yaml")
    assert minh.get("/api/users").status_code == 403
    assert minh.get("/api/audit").status_code == 403
    assert minh.get("/api/users/lan/receive-method").status_code == 403
    assert minh.post("/api/login", content=b"{" + b" " * 100_000 + b"}",
                     headers={"content-type": "application/json"}).status_code == 413
    assert minh.get("/api/users/nobody/receive-method").status_code == 403     # no "who exists" for agents
    assert minh.put("/api/users/nobody/receive-method", json={"method": "app"}).status_code == 403

    reply = minh.put("/api/me/receive-method", json={"method": "app"})
    assert reply.status_code == 200, reply.text
    assert minh.get("/api/users/minh/receive-method").json()["receive_method"] == "app"
    assert minh.put("/api/users/1002/receive-method", json={"method": "ip_phone"}).status_code == 200  # by extension
    entries = world.audit()
    assert [(e["user"], e["new"], e["by"], e["via"]) for e in entries] == [
        ("minh", "ip_phone", "minh", "api"), ("minh", "app", "minh", "api")]
    # an agent sees only their own registrations and calls
    assert minh.get("/api/registrations", params={"user": "lan"}).status_code == 403
    assert minh.get("/api/calls").status_code == 200


def test_a_bad_number_or_method_is_422_with_the_field_and_the_hint_and_writes_nothing(world: World) -> None:
    minh = world.login("minh")
    for typed in ("0987654321", "+84 987 654 321"):
        reply = minh.put("/api/me/receive-method", json={"method": "agent_phone", "agent_phone": typed})
        assert reply.status_code == 422, reply.text
        problem = reply.json()
        assert (problem["field"], problem["hint"]) == ("agent_phone", "84987654321")
        assert "84987654321" in problem["error"]
    reply = minh.put("/api/me/receive-method", json={"method": "carrier_pigeon"})
    assert reply.status_code == 422
    assert reply.json()["field"] == "method" and "agent_phone" in reply.json()["hint"]
    assert minh.put("/api/me/receive-method", json={}).status_code == 422
    assert world.login("lan").put("/api/users/nobody/receive-method", json={"method": "app"}).status_code == 404
    assert world.audit() == []

    # the right form: the phone is written first, then the method
    reply = minh.put("/api/me/receive-method", json={"method": "agent_phone", "agent_phone": "84987654322"})
    assert reply.status_code == 200, reply.text
    assert [(e["field"], e["new"]) for e in reversed(world.audit())] == [
        ("agent_phone", "84987654322"), ("receive_method", "agent_phone")]


def test_a_cookie_session_needs_the_csrf_token_for_every_change(world: World) -> None:
    browser = world.client()
    page = browser.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    reply = browser.post("/login", data={"user": "minh", "password": PASSWORDS["minh"], "csrf": token.group(1),
                                         "next": "/me"})
    assert reply.status_code == 303 and reply.headers["location"] == "/me", reply.text
    cookie = reply.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie

    assert browser.put("/api/me/receive-method", json={"method": "app"}).status_code == 403
    assert browser.post("/me", data={"method": "app"}).status_code == 403
    assert browser.post("/me", data={"method": "app", "csrf": "guess"}).status_code == 403
    assert browser.post("/me", data={"method": "app", "csrf": "é"}).status_code == 403        # not a 500
    assert browser.put("/api/me/receive-method", json={"method": "app"},
                       headers={"X-CSRF-Token": b"\xe9"}).status_code == 403         # raw bytes on the wire
    assert browser.post("/logout").status_code == 403
    assert world.audit() == []

    csrf = browser.get("/api/me").json()["csrf_token"]
    assert csrf
    reply = browser.put("/api/me/receive-method", json={"method": "app"}, headers={"X-CSRF-Token": csrf})
    assert reply.status_code == 200, reply.text
    reply = browser.post("/me", data={"method": "ip_phone", "agent_phone": "", "csrf": csrf})
    assert reply.status_code == 303 and reply.headers["location"] == "/me?saved=1"
    assert [(e["new"], e["via"]) for e in world.audit()] == [("ip_phone", "api"), ("app", "api")]
    # a login form with no token of its own is refused too (another site cannot log a browser in)
    stranger = world.client()
    assert stranger.post("/login", data={"user": "minh", "password": PASSWORDS["minh"]}).status_code == 400


def test_a_password_change_ends_other_logins_and_the_new_password_works(world: World) -> None:
    minh = world.login("minh")
    elsewhere = world.login("minh")
    wrong = minh.put("/api/me/password", json={"current": "not-it", "new": "a-new-password"})
    assert wrong.status_code == 422 and wrong.json()["field"] == "current"
    short = minh.put("/api/me/password", json={"current": PASSWORDS["minh"], "new": "short"})
    assert short.status_code == 422 and short.json()["field"] == "new"
    assert world.audit() == []

    reply = minh.put("/api/me/password", json={"current": PASSWORDS["minh"], "new": "a-new-password"})
    assert reply.status_code == 200, reply.text
    assert minh.get("/api/me").status_code == 200            # this session goes on
    assert elsewhere.get("/api/me").status_code == 401       # the other one ended
    assert world.client().post("/api/login", json={"user": "minh", "password": PASSWORDS["minh"]}).status_code == 401
    fresh = world.login("minh", "a-new-password")
    assert fresh.get("/api/me").json()["id"] == "minh"

    (entry,) = world.audit("minh")
    assert (entry["field"], entry["new"], entry["by"], entry["via"]) == ("password_hash", "(set)", "minh", "api")
    assert "$argon2" not in str(world.audit())
    assert all(e["new"] == "(set)" for e in world.login("lan").get("/api/audit").json())

    assert minh.post("/api/logout").status_code == 204
    assert minh.get("/api/me").status_code == 401
    log = world.web.log_text()
    assert "a-new-password" not in log and PASSWORDS["minh"] not in log and "$argon2" not in log
    assert "web.login.ok" in log


def test_failed_logins_are_throttled_per_user_and_client_then_per_address(strict_world: World) -> None:
    world = strict_world
    anonymous = world.client()
    bad = [anonymous.post("/api/login", json={"user": "minh", "password": f"wrong-{i}"}) for i in range(3)]
    assert [r.status_code for r in bad] == [401, 401, 401]
    unknown = anonymous.post("/api/login", json={"user": "nobody", "password": "wrong"})
    assert (unknown.status_code, unknown.json()) == (401, bad[0].json())     # no user enumeration

    started = time.monotonic()
    locked = anonymous.post("/api/login", json={"user": "minh", "password": PASSWORDS["minh"]})
    assert locked.status_code == 429, locked.text
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    assert "too many failed logins" in locked.json()["error"] and locked.json()["retry_after"] > 0
    assert time.monotonic() - started < 1.0
    assert anonymous.post("/api/login", json={"user": "1002", "password": PASSWORDS["minh"]}).status_code == 429
    # minh himself, elsewhere, is not locked out by someone guessing his password from here
    elsewhere = world.client(source="127.0.0.3")
    assert elsewhere.post("/api/login", json={"user": "minh", "password": PASSWORDS["minh"]}).status_code == 200

    # another user may still log in, until the address itself has failed too often
    assert anonymous.post("/api/login", json={"user": "lan", "password": PASSWORDS["lan"]}).status_code == 200
    for name in ("x1", "x2"):
        assert anonymous.post("/api/login", json={"user": name, "password": "wrong"}).status_code == 401
    blocked = anonymous.post("/api/login", json={"user": "lan", "password": PASSWORDS["lan"]})
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) <= 60
    assert "address" in blocked.json()["error"]

    browser = world.client()
    form = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text)
    assert form is not None
    shown = browser.post("/login", data={"user": "lan", "password": PASSWORDS["lan"], "csrf": form.group(1)})
    assert shown.status_code == 429 and "Too many failed attempts" in shown.text
    assert "wrong-1" not in world.web.log_text()


def test_changes_made_with_the_cli_show_in_the_api_at_once(world: World) -> None:
    minh = world.login("minh")
    assert minh.get("/api/me").json()["receive_method"] == "ip_phone"
    world.lab.cli("set-method", "minh", "app", "--as", "lan")
    me = minh.get("/api/me").json()
    assert (me["receive_method"], me["receive_method_source"]) == ("app", "runtime")
    assert me["last_change"]["by"] == "lan" and me["last_change"]["via"] == "cli"


def test_a_taken_port_is_one_line_naming_it_and_sigterm_stops_the_web_process(world: World) -> None:
    # a second web app on the same port: exit status 1 and the reason, no traceback (killed after 30 s if it hangs)
    second = subprocess.run([sys.executable, "-m", "router", "-c", str(world.lab.config), "web"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1, second.stderr
    assert f"cannot listen on 127.0.0.1:{world.web.port}" in second.stderr and "Traceback" not in second.stderr
    started = time.monotonic()
    assert world.web.stop() == 0
    assert time.monotonic() - started < 5
    assert world.web.events("web.stopped")


def test_with_a_certificate_it_speaks_https_and_the_session_cookie_is_secure(make_lab) -> None:
    port = web_port()
    lab = make_lab(edit=lambda text: with_web(port)(text).replace(
        "web: {", "web: {certificate: web-cert.pem, private_key: web-key.pem, "))
    state = lab.tmp / "state"
    ensure_self_signed(str(state / "web-cert.pem"), str(state / "web-key.pem"), ["127.0.0.1"])
    web = WebProcess(lab.config, port, tls=True).start()
    try:
        with httpx.Client(base_url=web.url, verify=False, timeout=10) as browser:
            form = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text)
            assert form is not None
            reply = browser.post("/login", data={"user": "lan", "password": PASSWORDS["lan"], "csrf": form.group(1)})
            assert reply.status_code == 303, reply.text
            cookie = reply.headers["set-cookie"]
            assert cookie.startswith("__Host-session=") and "secure" in cookie.lower() and "httponly" in cookie.lower()
            assert browser.get("/api/me").json()["id"] == "lan"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as plain, pytest.raises(httpx.HTTPError):
            plain.get("/login")
    finally:
        web.stop()
