"""The browser softphone page in headless Chromium, without the router: JsSIP loads, a dead WSS server shows as a
connection failure rather than a hang, and two pages call each other through a tiny SIP-over-WSS relay here, with
digest, answer, media and hang-up, as the integration tests will through the Kamailio edge."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.driver import JSSIP_BUNDLE, Browser, PageServer, ensure_jssip
from tests.support import free_port

pytestmark = pytest.mark.integration

JSSIP_PACKAGE = json.loads((Path(__file__).parent / "package.json").read_text())["dependencies"]["jssip"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ensure_jssip()
    with PageServer() as server, Browser(server) as browser:
        yield browser


def test_the_page_loads_jssip_and_a_dead_wss_server_is_a_connection_failure(browser, tmp_path):
    phone = browser.softphone()
    wss = f"wss://127.0.0.1:{free_port(socket.SOCK_STREAM)}"      # nothing listens there
    phone.open(wss, "sip:lan-web@pbx.test", "lan-web", "web-secret", display_name="Lan (web)")
    started = time.monotonic()
    error = phone.wait_registration_failed(timeout=10)
    assert time.monotonic() - started < 5, "a refused connection must show at once, not after a timeout"
    assert error.startswith("Connection Error"), error

    state = phone.state()
    assert JSSIP_BUNDLE.is_file()
    assert re.fullmatch(r"3\.\d+\.\d+", state["jssipVersion"]), state["jssipVersion"]
    assert phone.wait_for("package version", lambda s: s["jssipPackage"] is not None, 5)["jssipPackage"] == \
        JSSIP_PACKAGE
    assert not state["registered"] and state["connection"] == "disconnected"
    assert [e["type"] for e in state["events"]][:3] == ["loaded", "connecting", "connection failed"]
    assert state["incoming"] is None and not state["inCall"]

    shot = phone.screenshot(tmp_path / "softphone-unreachable.png")
    assert shot.stat().st_size > 10_000
    # JsSIP retries a lost connection, so waiting for registration goes on to its timeout, then shows why
    with pytest.raises(AssertionError, match=r"(?s)no registration within 1 s.*connection failed: Connection Error"):
        phone.wait_registered(timeout=1)


def test_the_page_without_settings_says_so(browser):
    phone = browser.softphone()
    phone.page.goto(phone.server.base_url + "softphone.html")
    phone.page.wait_for_function("() => window.softphone !== undefined")
    assert "missing settings" in phone.wait_registration_failed(timeout=5)
    assert "Not started" in phone.page.inner_text("#registration")


# --- a SIP-over-WebSocket relay: just enough of a registrar and proxy for two JsSIP pages to call each other -----

REALM = "pbx.test"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}


class _Conn:
    """One WebSocket (RFC 6455) over TLS: text frames only, which is all JsSIP sends."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.buf = b""

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def handshake(self) -> None:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
        key = {k.lower(): v for k, v in headers.items()}["sec-websocket-key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        # the browser drops a connection whose server does not agree to the "sip" subprotocol JsSIP asks for
        self.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: sip\r\n\r\n")

    def recv(self) -> str | None:
        while True:
            b0, b1 = self._read(2)
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(self._read(2), "big")
            elif length == 127:
                length = int.from_bytes(self._read(8), "big")
            mask = self._read(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(self._read(length)))
            opcode = b0 & 0x0F
            if opcode == 8:
                return None
            if opcode == 9:
                self._send(0xA, data)
            elif opcode == 1:
                return data.decode()

    def _send(self, opcode: int, data: bytes) -> None:
        n = len(data)
        head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big"))
        with self.lock:
            self.sock.sendall(head + data)

    def send(self, text: str) -> None:
        self._send(1, text.encode())


def _header(msg: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(.*?)\r$", msg, re.M | re.I)
    return m.group(1) if m else ""


class SipRelay:
    """A WSS server that registers users with MD5 digest and passes every other message between the pages as a
    wire would: requests by Request-URI user (the AOR's or the contact's), responses back to whoever sent the
    request with that Via branch."""

    def __init__(self, tmp: Path) -> None:
        cert, key = tmp / "relay.crt", tmp / "relay.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"wss://127.0.0.1:{self.port}"
        self.users: dict[str, _Conn] = {}
        self.branches: dict[str, _Conn] = {}
        self.nonce = secrets.token_hex(8)
        self.log: list[str] = []
        self.conns: list[_Conn] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def stop(self) -> None:
        # shutdown, not only close: on Linux close leaves a thread blocked in accept or recv waiting
        for sock in [self.listener, *(conn.sock for conn in self.conns)]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for t in self.threads:
            t.join(5)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = _Conn(self.tls.wrap_socket(raw, server_side=True))
            self.conns.append(conn)
            conn.handshake()
            while (msg := conn.recv()) is not None:
                self.log.append(msg.split("\r\n", 1)[0])
                self._route(conn, msg)
        except (OSError, ConnectionError, ssl.SSLError):
            pass

    def _route(self, conn: _Conn, msg: str) -> None:
        branch = re.search(r"branch=([^;,\s]+)", _header(msg, "Via"))
        if msg.startswith("SIP/2.0"):
            target = self.branches.get(branch.group(1)) if branch else None
            if target:
                target.send(msg)
            return
        if msg.startswith("REGISTER"):
            self._register(conn, msg)
            return
        user = re.match(r"\S+ sips?:([^@;>\s]+)@", msg)
        target = self.users.get(user.group(1)) if user else None
        if target is None:
            if not msg.startswith("ACK"):
                conn.send(self._reply(msg, "404 Not Found"))
            return
        if branch:
            self.branches[branch.group(1)] = conn
        target.send(msg)

    def _reply(self, msg: str, status: str, *extra: str) -> str:
        to = _header(msg, "To")
        if ";tag=" not in to:
            to += ";tag=" + secrets.token_hex(4)
        lines = [f"SIP/2.0 {status}", *(f"Via: {v}" for v in re.findall(r"^Via:\s*(.*?)\r$", msg, re.M)),
                 f"From: {_header(msg, 'From')}", f"To: {to}", f"Call-ID: {_header(msg, 'Call-ID')}",
                 f"CSeq: {_header(msg, 'CSeq')}", *extra, "Content-Length: 0"]
        return "\r\n".join(lines) + "\r\n\r\n"

    def _register(self, conn: _Conn, msg: str) -> None:
        user = re.search(r"sips?:([^@;>]+)@", _header(msg, "To"))
        name = user.group(1) if user else ""
        auth = dict(re.findall(r'(\w+)="?([^",]*)"?', _header(msg, "Authorization")))
        if not self._digest_ok(auth, "REGISTER", name):
            conn.send(self._reply(msg, "401 Unauthorized", f'WWW-Authenticate: Digest realm="{REALM}", '
                                                           f'nonce="{self.nonce}", algorithm=MD5, qop="auth"'))
            return
        contact = _header(msg, "Contact")
        expires = re.search(r"expires=(\d+)", contact) or re.search(r"(\d+)", _header(msg, "Expires") or "600")
        if expires and expires.group(1) == "0":
            self.users.pop(name, None)
        else:
            self.users[name] = conn
            contact_user = re.search(r"sips?:([^@;>]+)@", contact)
            if contact_user:
                self.users[contact_user.group(1)] = conn     # in-dialog requests name the contact
        conn.send(self._reply(msg, "200 OK", f"Contact: {contact}"))

    def _digest_ok(self, auth: dict[str, str], method: str, user: str) -> bool:
        if auth.get("username") != user or user not in PASSWORDS or not all(
                k in auth for k in ("uri", "nonce", "nc", "cnonce", "response")):
            return False
        ha1 = hashlib.md5(f"{user}:{REALM}:{PASSWORDS[user]}".encode()).hexdigest()
        ha2 = hashlib.md5(f"{method}:{auth['uri']}".encode()).hexdigest()
        want = hashlib.md5(f"{ha1}:{auth['nonce']}:{auth['nc']}:{auth['cnonce']}:auth:{ha2}".encode()).hexdigest()
        return auth.get("response") == want and auth.get("nonce") == self.nonce


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[SipRelay]:
    relay = SipRelay(tmp_path)
    try:
        yield relay
    finally:
        relay.stop()


def test_two_pages_register_with_digest_and_call_each_other_over_wss(browser, relay, tmp_path):
    alice = browser.softphone().open(relay.url, "sip:alice@pbx.test", "alice", "alice-secret",
                                     display_name="Alice Caller")
    bob = browser.softphone().open(relay.url, "sip:bob@pbx.test", "bob", "bob-secret", display_name="Bob Agent",
                                   instance="2f1c7a5e-8a44-4b7e-9d0c-3a1e6f0b9c11")
    alice.wait_registered()
    state = bob.wait_registered()
    assert [line for line in state["sip"] if "REGISTER" in line or "SIP/2.0" in line][:4] == [
        "> REGISTER sip:pbx.test SIP/2.0", "< SIP/2.0 401 Unauthorized",
        "> REGISTER sip:pbx.test SIP/2.0", "< SIP/2.0 200 OK"]

    alice.call("sip:bob@pbx.test")
    incoming = bob.wait_incoming()
    assert incoming["displayName"] == "Alice Caller" and incoming["uri"] == "sip:alice@pbx.test"
    assert "UDP/TLS/RTP/SAVPF" in bob.state()["remoteSdp"]
    bob.screenshot(tmp_path / "softphone-incoming.png")
    assert "Incoming call from Alice Caller" in bob.page.inner_text("#call")

    started = time.monotonic()
    bob.answer()
    bob.wait_in_call(timeout=10)
    alice.wait_in_call(timeout=10)
    assert time.monotonic() - started < 5, "ICE gathering must not hold up the answer"
    assert "a=candidate" in bob.state()["localSdp"]
    stats = bob.wait_media(timeout=10)
    assert alice.wait_media(timeout=10)["packetsReceived"] >= 10
    assert stats["iceConnectionState"] in ("connected", "completed"), stats
    bob.screenshot(tmp_path / "softphone-in-call.png")

    alice.hangup()                   # the caller hangs up, as in the router's tests
    ended = bob.wait_ended()
    assert (ended["endCause"], ended["endOriginator"]) == ("Terminated", "remote")
    assert "Call ended (Terminated)" in bob.page.inner_text("#call")
    assert bob.media()["packetsReceived"] >= 10, "the last media sample outlives the call"
    bob.screenshot(tmp_path / "softphone-call-ended.png")

    bob.stop()
    bob.wait_unregistered()
    assert "bob" not in relay.users
