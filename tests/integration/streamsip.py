"""A SIP peer over TCP or TLS (RFC 3261 §18.3 framing by Content-Length), for the edge tests.

It plays a mobile app: one connection, registered with digest credentials, and
it answers the requests that come back over that same connection.
"""

from __future__ import annotations

import itertools
import time

from router.sip.message import SipMessage, parse
from tests.integration.edge import StreamClient
from tests.integration.rawsip import authorization

_counter = itertools.count(1)


class StreamPeer:
    """``edge.StreamClient`` (TCP or TLS framing) playing a registered app."""

    def __init__(self, host: str, port: int, tls: bool = False, source_host: str | None = None) -> None:
        self.client = StreamClient(host, port, tls=tls, timeout=5.0, source_host=source_host)
        self.transport = "tls" if tls else "tcp"
        self.local_host, self.local_port = self.client.local

    def close(self) -> None:
        try:
            self.client.close()
        except OSError:
            pass

    def __enter__(self) -> StreamPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.client.send(data)

    def recv(self, timeout: float = 5.0) -> SipMessage:
        return parse(self.client.recv(timeout))

    def wait_request(self, method: str, timeout: float = 5.0) -> SipMessage:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(deadline - time.monotonic(), 0.01))
            if msg.is_request and msg.method == method:
                return msg

    @property
    def contact(self) -> str:
        return f"sip:app-{self.local_port}@{self.local_host}:{self.local_port};transport={self.transport}"

    def register(self, aor: str, cseq: int, call_id: str, authorization: str = "",
                 domain: str = "pbx.test", expires: int = 300) -> SipMessage:
        n = next(_counter)
        text = (f"REGISTER sip:{domain} SIP/2.0\r\n"
                f"Via: SIP/2.0/{self.transport.upper()} {self.local_host}:{self.local_port};"
                f"branch=z9hG4bK-st-{n};rport\r\n"
                f"From: <sip:{aor}@{domain}>;tag=st{n}\r\nTo: <sip:{aor}@{domain}>\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nContact: <{self.contact}>\r\n"
                f"Expires: {expires}\r\nSupported: path\r\nUser-Agent: stream-app\r\n"
                f"{authorization}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        self.send(text.encode())
        while True:
            msg = self.recv()
            if not msg.is_request and msg.status >= 200:
                return msg

    def register_with(self, aor: str, username: str, password: str, domain: str = "pbx.test",
                      algorithm: str = "MD5") -> SipMessage:
        call_id = f"st-{next(_counter)}@{self.local_host}"
        challenge = self.register(aor, 1, call_id, domain=domain)
        header = authorization(challenge, algorithm, username, password, f"sip:{domain}")
        return self.register(aor, 2, call_id, header, domain=domain)

    def answer(self, request: SipMessage, status: int, reason: str, tag: str = "app",
               body: bytes = b"", extra: str = "") -> None:
        """A response to ``request`` back over this connection (every Via and Record-Route kept)."""
        lines = [f"SIP/2.0 {status} {reason}", *(f"Via: {v}" for v in request.all("via")),
                 *(f"Record-Route: {r}" for r in request.all("record-route")),
                 f"From: {request.header('from')}", f"To: {request.header('to')};tag={tag}",
                 f"Call-ID: {request.call_id}", f"CSeq: {request.header('cseq')}",
                 f"Contact: <{self.contact}>"]
        if extra:
            lines.append(extra)
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
