"""The Kamailio + rtpengine edge on loopback, for tests: started and stopped by PID.

``EdgeLab(policy, log_dir)`` renders the policy's edge into ``log_dir/edge`` (making
the self-signed pair when configured), starts rtpengine (when the edge has one) and
Kamailio, and waits until both answer: rtpengine its ng ``ping``, Kamailio a TCP
connect on each stream listener and a ``483`` to an OPTIONS with Max-Forwards 0 on
its UDP listener.  ``stop`` (also ``__exit__``, also after a failure) ends both by
PID; their logs stay in ``log_dir`` for a failing test to show.

``write_edge_config`` writes a router YAML with an edge section on free loopback
ports; ``StreamClient`` and ``WsClient`` are SIP clients over TCP/TLS and WSS;
``RouterStandIn`` is a UDP socket in the router's place, for tests of the edge alone.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

from router.config import load_policy
from router.edge.certs import ensure_self_signed
from router.edge.render import KAMAILIO_CFG, kamailio_command, render, rtpengine_command
from router.edge.write import kamailio_binary, write_files
from router.policy.model import Policy
from router.sip.message import SipMessage, build_response, parse
from tests.support import free_port, stop_process

INTERNAL_ADDRESS = "127.0.0.2"     # not 127.0.0.1: tests trust 127.0.0.1/32 as a peer


def write_edge_config(directory: Path, router_port: int, extra: str = "", **edge: object) -> Path:
    """A router YAML (``directory/router.yaml``) whose edge listens on free loopback ports:
    udp+tcp share one, tls and wss their own, the internal socket on 127.0.0.2, rtpengine's
    control socket on a free port.  Keyword arguments override edge keys (``wss="off"``,
    ``rtpengine="off"``); ``extra`` is appended YAML (users, registrar...)."""
    port = free_port()
    fields: dict[str, object] = {
        "address": "127.0.0.1", "udp": port, "tcp": port, "tls": free_port(socket.SOCK_STREAM),
        "wss": free_port(socket.SOCK_STREAM), "internal_address": INTERNAL_ADDRESS,
        "internal_port": free_port(),
        "rtpengine": f"127.0.0.1:{free_port()}",
        "rtp_ports": "[42000, 42999]"}
    fields.update(edge)
    lines = ["domain: pbx.test", f"state_dir: {directory / 'state'}",
             f"listen: [{{address: 127.0.0.1, port: {router_port}, transport: udp}}]",
             "users: []", "edge:"] + [f"  {key}: {value}" for key, value in fields.items()]
    path = directory / "router.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def rtpengine_ping(host: str, port: int, timeout: float = 0.3) -> bool:
    """True when rtpengine's ng control socket answers ``ping`` with ``pong``."""
    cookie = secrets.token_hex(4).encode()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(cookie + b" d7:command4:pinge", (host, port))
            data = s.recv(65535)
        except OSError:
            return False
    return data == cookie + b" d6:result4:ponge"


def _udp_answers(host: str, port: int, timeout: float = 0.3) -> bool:
    """Kamailio answers an OPTIONS with Max-Forwards: 0 itself (483), relaying nothing."""
    v6 = ":" in host
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("::1" if v6 else "127.0.0.1", 0))
        s.settimeout(timeout)
        me = s.getsockname()[1]
        branch = f"z9hG4bK-ready-{time.monotonic_ns()}"
        here, there = ("[::1]", f"[{host}]") if v6 else ("127.0.0.1", host)
        s.sendto((f"OPTIONS sip:{there}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {here}:{me};branch={branch}\r\n"
                  f"From: <sip:ready@{there}>;tag=r\r\nTo: <sip:{there}>\r\nCall-ID: ready-{branch}\r\n"
                  "CSeq: 1 OPTIONS\r\nMax-Forwards: 0\r\nContent-Length: 0\r\n\r\n").encode(), (host, port))
        try:
            return s.recv(65535).startswith(b"SIP/2.0 483")
        except OSError:
            return False


def _tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


class _Daemon:
    """One child process, its output in a log file, stopped by its PID."""

    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name = name
        self.command = command
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            # its own session: Kamailio's children share the group, so a stuck set can be
            # killed by the main PID's group, never by name
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, timeout)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)     # any child left behind by the main process
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class EdgeLab:
    """rtpengine and Kamailio for ``policy.edge``, on loopback.

    Attributes: ``udp_port``, ``tcp_port``, ``tls_port``, ``wss_port`` (None when off),
    ``address`` (the client-facing address), ``internal`` ((address, port) toward the
    router), ``router`` ((address, port) the edge relays to), ``rtpengine`` ((host, port)
    or None), ``directory`` (the rendered files), ``config`` (kamailio.cfg), ``log_dir``.
    """

    def __init__(self, policy: Policy | str | Path, log_dir: Path) -> None:
        self.policy = policy if isinstance(policy, Policy) else load_policy(str(policy))
        edge = self.policy.edge
        assert edge is not None, "the policy has no edge section"
        self.edge = edge
        self.log_dir = log_dir
        self.directory = log_dir / "edge"
        self.config = self.directory / KAMAILIO_CFG
        self.address = edge.public_address      # where clients connect
        self.udp_port, self.tcp_port, self.tls_port, self.wss_port = (
            edge.udp_port, edge.tcp_port, edge.tls_port, edge.wss_port)
        self.internal = (edge.internal_address, edge.internal_port)
        udp = next(x for x in self.policy.listen if x.transport == "udp")
        self.router = (udp.address, udp.port)
        self.rtpengine = edge.rtpengine
        self.kamailio = _Daemon("kamailio", [], log_dir / "kamailio.log")
        self.media = _Daemon("rtpengine", [], log_dir / "rtpengine.log")

    def prepare(self) -> Path:
        """Render and write the edge's files (and the self-signed pair); the kamailio.cfg path."""
        if self.edge.self_signed and (self.tls_port or self.wss_port):
            ensure_self_signed(self.edge.certificate, self.edge.private_key, [self.edge.public_address])
        write_files(render(self.policy, directory=str(self.directory)), str(self.directory))
        return self.config

    def start(self, timeout: float = 20.0) -> EdgeLab:
        binary = kamailio_binary()
        if binary is None:
            raise RuntimeError("kamailio is not installed (Debian packages kamailio, "
                               "kamailio-websocket-modules, kamailio-tls-modules)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        try:
            if self.rtpengine is not None:
                self.media.command = rtpengine_command(self.policy)
                self.media.start()
                self._wait("rtpengine", self.media, lambda: rtpengine_ping(*self.rtpengine_address), timeout)
            self.kamailio.command = kamailio_command(str(self.config), binary)
            self.kamailio.start()
            self._wait("kamailio", self.kamailio, self._kamailio_ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def rtpengine_address(self) -> tuple[str, int]:
        assert self.rtpengine is not None
        return self.rtpengine

    def _kamailio_ready(self) -> bool:
        streams = [p for p in (self.tcp_port, self.tls_port, self.wss_port) if p]
        return all(_tcp_answers(self.address, p) for p in streams) and (
            self.udp_port is None or _udp_answers(self.address, self.udp_port))

    def _wait(self, name: str, daemon: _Daemon, ready: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not daemon.running():
                raise RuntimeError(f"{name} exited at start:\n{daemon.text()[-4000:]}")
            if callable(ready) and ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready in {timeout} s:\n{daemon.text()[-4000:]}")

    def stop(self) -> None:
        """Kamailio first (it may still be asking rtpengine to delete calls), then rtpengine."""
        self.kamailio.stop()
        self.media.stop()

    def __enter__(self) -> EdgeLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self) -> str:
        """Both logs, for an assertion message."""
        return (f"--- kamailio ({self.kamailio.log})\n{self.kamailio.text()[-6000:]}\n"
                f"--- rtpengine ({self.media.log})\n{self.media.text()[-3000:]}")


def read_sip(buffer: bytearray, recv: object, timeout: float = 3.0) -> bytes:
    """One SIP message from a stream: headers to the blank line, then exactly
    Content-Length bytes of body.  ``recv()`` returns more bytes (b"" at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        end = buffer.find(b"\r\n\r\n")
        while buffer.startswith(b"\r\n") and end != 0:       # CRLF keep-alive answers
            del buffer[:2]
            end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).decode(errors="replace")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() in ("content-length", "l"):
                    length = int(value.strip())
            if len(buffer) >= end + 4 + length:
                message = bytes(buffer[:end + 4 + length])
                del buffer[:end + 4 + length]
                return message
        if time.monotonic() > deadline:
            raise TimeoutError("no complete SIP message")
        assert callable(recv)
        chunk = recv()
        if not chunk:
            raise ConnectionError("the edge closed the connection")
        buffer.extend(chunk)


class StreamClient:
    """A SIP client over TCP (or TLS with ``tls=True``, any certificate accepted)."""

    def __init__(self, host: str, port: int, tls: bool = False, timeout: float = 3.0,
                 source_host: str | None = None) -> None:
        raw = socket.create_connection((host, port), timeout=timeout,
                                       source_address=(source_host, 0) if source_host else None)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            raw = context.wrap_socket(raw)
        self.sock = raw
        self.local = raw.getsockname()[:2]
        self._buffer = bytearray()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv(self, timeout: float = 3.0) -> bytes:
        self.sock.settimeout(timeout)
        return read_sip(self._buffer, lambda: self.sock.recv(65535), timeout)

    def close(self) -> None:
        self.sock.close()


class WsClient:
    """A SIP client over a secure WebSocket (RFC 6455 + RFC 7118), as a browser connects:
    text frames, masked; the edge's pings are answered."""

    def __init__(self, host: str, port: int, timeout: float = 3.0) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(socket.create_connection((host, port), timeout=timeout))
        self.local = self.sock.getsockname()[:2]
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Protocol: sip\r\nSec-WebSocket-Version: 13\r\n"
                           "Origin: https://localhost\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the edge closed the WebSocket handshake")
            answer += chunk
        head, _, self._rest = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"WebSocket refused: {head.decode(errors='replace')}")
        self._messages = bytearray()

    def send(self, data: bytes | str) -> None:
        payload = data.encode() if isinstance(data, str) else data
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x81, 0x80 | size)
        elif size < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _read(self, n: int) -> bytes:
        while len(self._rest) < n:
            chunk = self.sock.recv(65535)
            if not chunk:
                raise ConnectionError("the edge closed the WebSocket")
            self._rest += chunk
        out, self._rest = self._rest[:n], self._rest[n:]
        return out

    def _frame(self) -> bytes:
        """The payload of the next text frame (pings are answered on the way)."""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", self._read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(size)
            opcode = first & 0x0F
            if opcode == 0x9:                                  # ping -> pong
                mask = os.urandom(4)
                self.sock.sendall(struct.pack("!BB", 0x8A, 0x80 | len(payload)) + mask
                                  + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            elif opcode == 0x8:
                raise ConnectionError("the edge closed the WebSocket")
            elif opcode in (0x1, 0x2, 0x0):
                return payload

    def recv(self, timeout: float = 3.0) -> bytes:
        """One SIP message (RFC 7118: each frame holds exactly one)."""
        self.sock.settimeout(timeout)
        return self._frame()

    def close(self) -> None:
        self.sock.close()


class RouterStandIn:
    """A UDP socket in the router's place, for tests of the edge alone: it sees what the
    edge relays and sends what the router would (``tests.integration.edge`` users that
    want the real router start ``RouterProcess`` on the same port instead)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.address = (host, port)
        self.last_source: tuple[str, int] = ("", 0)

    def recv(self, timeout: float = 3.0, skip_provisional: bool = True) -> SipMessage:
        """The next message (100 Trying skipped unless ``skip_provisional`` is False)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data, self.last_source = self.sock.recvfrom(65535)
            message = parse(data)
            if not (skip_provisional and message.status == 100):
                return message

    def recv_call(self, call_id: str, timeout: float = 3.0) -> SipMessage:
        """The next message of ``call_id``; others (retransmissions of earlier ones) are passed over."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if message.call_id == call_id:
                return message

    def send(self, data: bytes | str, to: tuple[str, int]) -> None:
        self.sock.sendto(data.encode() if isinstance(data, str) else data, to)

    def reply(self, request: SipMessage, status: int, reason: str, to_tag: str = "router",
              headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        """Answer ``request`` back to the edge it came from (Record-Route echoed)."""
        extra = [("Record-Route", value) for value in request.all("record-route")] + list(headers or [])
        if body:
            extra.append(("Content-Type", "application/sdp"))
        self.send(build_response(request, status, reason, self.last_source, to_tag, extra, body), self.last_source)

    def close(self) -> None:
        self.sock.close()
