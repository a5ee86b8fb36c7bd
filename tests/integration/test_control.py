"""The control socket of the running router: status, calls, unregister and reload.

The real router process on loopback; minh's desk phone and the ACD are raw UDP
peers (``UdpPeer``), so a call can be held ringing, then answered, while the
socket is asked about it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.sip.forward import render
from router.sip.message import SipMessage, parse
from tests.integration.conftest import Lab
from tests.integration.rawsip import UdpPeer
from tests.support import free_port

pytestmark = pytest.mark.integration


def socket_path(lab: Lab) -> Path:
    return lab.tmp / "state" / "control.sock"


def control(lab: Lab, request: dict[str, Any] | bytes, timeout: float = 10.0) -> dict[str, Any]:
    """One request over the control socket, as the CLI sends it; the decoded reply."""
    line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path(lab)))
        sock.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)  # type: ignore[no-any-return]


def result(lab: Lab, command: str, **args: object) -> dict[str, Any]:
    reply = control(lab, {"command": command, "args": args})
    assert reply["ok"] is True, reply
    return reply["result"]  # type: ignore[no-any-return]


def _response(request: SipMessage, status: int, reason: str, tag: str, contact: str = "") -> bytes:
    """A phone's answer to ``request``: its Vias, Record-Route, From, Call-ID, CSeq, and To with our tag."""
    headers = [(n, v) for n, v in request.headers if n in ("via", "record-route", "from", "call-id", "cseq")]
    to = request.header("to") or ""
    headers.append(("to", to if ";tag=" in to else f"{to};tag={tag}"))
    if contact:
        headers.append(("contact", f"<{contact}>"))
    return render(f"SIP/2.0 {status} {reason}", headers, b"")


def _next(peer: UdpPeer, method: str | None = None, status: int | None = None, tries: int = 8) -> SipMessage:
    """The next request of ``method`` or response of ``status``, past retransmissions and 100s."""
    for _ in range(tries):
        msg = peer.recv()
        if method is not None and msg.is_request and msg.method == method:
            return msg
        if status is not None and not msg.is_request and msg.status == status:
            return msg
    raise AssertionError(f"no {method or status} within {tries} messages")


class RingingCall:
    """The ACD (127.0.0.1, a trusted peer) calls minh; minh's registered desk phone rings."""

    def __init__(self, lab: Lab, acd: UdpPeer, desk: UdpPeer, call_id: str) -> None:
        self.lab, self.acd, self.desk, self.call_id = lab, acd, desk, call_id
        self.contact = f"sip:1002-raw@127.0.0.1:{desk.port}"

    def _in_dialog(self, method: str, cseq: int) -> bytes:
        return (f"{method} {self.contact} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.acd.port};branch=z9hG4bK-{method.lower()}-{self.call_id};rport\r\n"
                f"Route: <sip:127.0.0.1:{self.lab.port};lr>\r\n"
                f"From: <sip:0909123456@acd.test>;tag=acd1\r\nTo: <sip:1002@pbx.test>;tag=desk1\r\n"
                f"Call-ID: {self.call_id}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n"
                "Content-Length: 0\r\n\r\n").encode()

    def ring(self) -> RingingCall:
        self.acd.send((f"INVITE sip:1002@127.0.0.1:{self.lab.port} SIP/2.0\r\n"
                       f"Via: SIP/2.0/UDP 127.0.0.1:{self.acd.port};branch=z9hG4bK-inv-{self.call_id};rport\r\n"
                       "From: <sip:0909123456@acd.test>;tag=acd1\r\nTo: <sip:1002@pbx.test>\r\n"
                       f"Call-ID: {self.call_id}\r\nCSeq: 1 INVITE\r\n"
                       f"Contact: <sip:acd@127.0.0.1:{self.acd.port}>\r\n"
                       "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode())
        self.invite = _next(self.desk, "INVITE")
        self.desk.send(_response(self.invite, 180, "Ringing", "desk1"))
        _next(self.acd, status=180)
        return self

    def answer(self) -> None:
        self.desk.send(_response(self.invite, 200, "OK", "desk1", self.contact))
        _next(self.acd, status=200)
        self.acd.send(self._in_dialog("ACK", 1))
        _next(self.desk, "ACK")

    def hang_up(self) -> None:
        self.acd.send(self._in_dialog("BYE", 2))
        bye = _next(self.desk, "BYE")
        self.desk.send(_response(bye, 200, "OK", "desk1"))
        _next(self.acd, status=200)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """The router's /metrics, parsed by prometheus_client: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def registered_desk(lab: Lab) -> UdpPeer:
    desk = UdpPeer(lab.port)
    assert desk.register_with("MD5", "1002", "minh-desk", "minh-secret").status == 200
    return desk


def test_the_socket_is_owner_only_and_status_shows_the_running_router(lab):
    mode = os.stat(socket_path(lab)).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    with registered_desk(lab) as desk, UdpPeer(lab.port) as acd:
        RingingCall(lab, acd, desk, "ctl-status-1").ring()
        status = result(lab, "status")
    assert status["pid"] == lab.router.pid and status["config"] == str(lab.config)
    assert status["version"] and status["uptime_s"] > 0 and status["policy_marker"] == 0
    assert status["registrations"] == {"web": 0, "app": 0, "ip_phone": 1}
    assert status["registrations_by_transport"] == {"udp": 1}
    assert status["calls"] == {"ringing": 1, "answered": 0}
    # The lab's trunk has no credentials: configured, nothing to register.
    assert status["trunk"]["configured"] is True and status["trunk"]["registered"] is None
    counters = status["counters"]
    assert counters["requests"] >= 3 and counters["responses"] >= 1 and counters["sent"] >= 4


def test_calls_lists_a_ringing_call_then_the_answered_one_until_the_bye(lab):
    with registered_desk(lab) as desk, UdpPeer(lab.port) as acd:
        call = RingingCall(lab, acd, desk, "ctl-calls-1").ring()
        (ringing,) = result(lab, "calls")["calls"]
        assert (ringing["call_id"], ringing["state"], ringing["user"]) == ("ctl-calls-1", "ringing", "minh")
        assert ringing["method"] == "ip_phone" and ringing["branches"] == ["minh-desk"]
        assert ringing["queue"] == "support" and ringing["answered_by"] is None
        assert time.time() - 10 < ringing["started_at"] <= time.time()
        call.answer()
        (answered,) = result(lab, "calls")["calls"]
        assert (answered["state"], answered["answered_by"]) == ("answered", "minh-desk")
        assert result(lab, "status")["calls"] == {"ringing": 0, "answered": 1}
        call.hang_up()
        assert result(lab, "calls") == {"calls": []}


def test_unregister_removes_a_device_and_stores_it(lab):
    with registered_desk(lab):
        assert [b["device"] for b in lab.registrations("minh")] == ["minh-desk"]
    assert result(lab, "unregister", device="minh-desk") == {"device": "minh-desk", "removed": 1}
    assert result(lab, "status")["registrations"]["ip_phone"] == 0
    assert lab.registrations("minh") == []          # stored: the state database has no binding left
    assert result(lab, "unregister", device="minh-desk")["removed"] == 0
    unknown = control(lab, {"command": "unregister", "args": {"device": "nobody-desk"}})
    assert unknown["ok"] is False and "no device 'nobody-desk'" in unknown["error"]
    assert "registrations" in unknown["error"]
    missing = control(lab, {"command": "unregister"})
    assert missing["ok"] is False and '"device"' in missing["error"]
    assert lab.router.events("registration.removed")[0]["via"] == "control"


def test_reload_refuses_a_broken_file_with_its_errors_and_applies_a_good_one(lab):
    good = lab.config.read_text()
    lab.config.write_text(good.replace('agent_phone: "84987654321"', 'agent_phone: "0987654321"'))
    refused = result(lab, "reload")
    assert refused["reloaded"] is False and refused["users"] == 2
    assert any(e.startswith(f"{lab.config}:") and "84987654321" in e for e in refused["errors"])
    lab.config.write_text(good.replace(
        "      - {id: minh-desk, kind: ip_phone, username: minh-desk, password: minh-secret}",
        "      - {id: minh-desk, kind: ip_phone, username: minh-desk, password: minh-secret}\n"
        "      - {id: minh-tab, kind: app, username: minh-tab, password: tab-secret}"))
    assert result(lab, "reload") == {"reloaded": True, "errors": [], "users": 2}
    with UdpPeer(lab.port) as tablet:               # in force at once: the new device registers
        assert tablet.register_with("MD5", "1002", "minh-tab", "tab-secret").status == 200
    assert lab.router.events("policy.reloaded") and lab.router.events("policy.reload.refused")


def test_a_request_the_router_cannot_read_gets_an_error_a_person_can_act_on(lab):
    not_json = control(lab, b"status please\n")
    assert not_json["ok"] is False and '{"command": "status"' in not_json["error"]
    unknown = control(lab, {"command": "restart"})
    assert unknown["ok"] is False and "calls, reload, status, unregister" in unknown["error"]
    bad_args = control(lab, {"command": "unregister", "args": ["minh-desk"]})
    assert bad_args["ok"] is False and '"args" must be an object' in bad_args["error"]
    assert control(lab, b'["status"]\n')["ok"] is False
    assert result(lab, "status")["pid"] == lab.router.pid       # and the router goes on serving


def test_a_stale_socket_is_replaced_at_start_and_the_socket_is_removed_at_a_clean_exit(make_lab):
    lab = make_lab(start=False)
    path = socket_path(lab)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))                 # a crashed router's socket: the file stays, nobody listens
    stale.close()
    lab.router.start()
    assert result(lab, "status")["pid"] == lab.router.pid
    assert lab.router.stop() == 0
    assert not path.exists()


class RegistrarTrunk:
    """A PSTN trunk that accepts the router's REGISTER with 200 (a thread, stopped on exit)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.registers = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RegistrarTrunk:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            request = parse(data)
            if not request.is_request or request.method != "REGISTER":
                continue
            self.registers += 1
            headers = [(n, v) for n, v in request.headers if n in ("via", "from", "call-id", "cseq")]
            headers += [("to", f"{request.header('to')};tag=trunk1"),
                        ("contact", f"{request.header('contact')};expires=300")]
            self.sock.sendto(render("SIP/2.0 200 OK", headers, b""), source)


def test_status_and_metrics_show_the_trunk_registration(make_lab):
    metrics_port = free_port(socket.SOCK_STREAM)

    def edit(text: str) -> str:
        return text.replace("trunk: {address: 127.0.0.1, port: ", "trunk: {username: hotline, password: pw, "
                            "address: 127.0.0.1, port: ") + f"metrics: {{port: {metrics_port}}}\n"
    lab = make_lab(start=False, edit=edit)
    with RegistrarTrunk(lab.trunk_port) as registrar:
        lab.router.start()
        deadline = time.monotonic() + 5
        while (trunk := result(lab, "status")["trunk"])["registered"] is not True:
            assert time.monotonic() < deadline, (trunk, lab.router.log_text()[-2000:])
            time.sleep(0.2)
        assert trunk["configured"] is True and "200" in trunk["detail"] and registrar.registers >= 1
        time.sleep(1.1)                               # the gauge is republished once a second
        assert value(scrape(metrics_port), "sip_router_trunk_registered") == 1


def test_systemd_hears_ready_status_watchdog_reloading_and_stopping(make_lab, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    heard: list[str] = []

    def listen(seconds: float, until: str | None = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and (until is None or until not in heard):
            try:
                heard.extend(notify.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass
    try:
        lab = make_lab(start=False)
        lab.router.env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "5000000"}
        lab.router.start()
        listen(2.5)
        assert heard[0] == "READY=1"
        assert heard.count("WATCHDOG=1") >= 2                      # from the PJSIP loop, every second
        (status,) = [line for line in heard if line.startswith("STATUS=")][:1]
        assert status.startswith("STATUS=0 registrations") and "0 calls ringing" in status
        heard.clear()
        lab.router.signal(signal.SIGHUP)
        listen(5, until="READY=1")
        assert "RELOADING=1" in heard and heard.index("RELOADING=1") < heard.index("READY=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in heard)
        heard.clear()
        assert lab.router.stop() == 0
        listen(0.5)
        assert "STOPPING=1" in heard
    finally:
        notify.close()
