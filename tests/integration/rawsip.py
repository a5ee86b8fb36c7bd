"""A plain UDP SIP peer for what SIPp cannot do (SHA-256 digest, byte-exact malformed input)."""

from __future__ import annotations

import itertools
import socket
import time

from router.sip import digest
from router.sip.message import SipMessage, auth_params, parse

_counter = itertools.count(1)


class UdpPeer:
    def __init__(self, router_port: int, host: str = "127.0.0.1") -> None:
        self.router = ("127.0.0.1", router_port)
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(2.0)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.last_sent = data
        self.sock.sendto(data, self.router)

    def recv(self) -> SipMessage:
        data, _ = self.sock.recvfrom(65535)
        return parse(data)

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            self.sock.recvfrom(65535)
            return False
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2.0)

    def register(self, aor: str, cseq: int, call_id: str, authorization: str = "",
                 expires: int = 300, domain: str = "pbx.test", to: str | None = None,
                 contact: str | None = None, sent_by: str | None = None) -> SipMessage:
        """``contact``/``sent_by``: what a phone behind NAT writes (its private address)."""
        n = next(_counter)
        text = (f"REGISTER sip:{domain} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {sent_by or f'127.0.0.1:{self.port}'};branch=z9hG4bK-raw-{n};rport\r\n"
                f"From: <sip:{aor}@{domain}>;tag=raw{n}\r\nTo: {to or f'<sip:{aor}@{domain}>'}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
                f"Contact: <{contact or f'sip:{aor}-raw@127.0.0.1:{self.port}'}>\r\nExpires: {expires}\r\n"
                f"{authorization}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        self.send(text.encode())
        return self.recv()

    def register_with(self, algorithm: str, aor: str, username: str, password: str,
                      domain: str = "pbx.test", to: str | None = None,
                      contact: str | None = None, sent_by: str | None = None) -> SipMessage:
        """The whole digest exchange, answering the challenge of ``algorithm``."""
        call_id = f"raw-{next(_counter)}@127.0.0.1"
        challenge = self.register(aor, 1, call_id, to=to, contact=contact, sent_by=sent_by)
        header = authorization(challenge, algorithm, username, password, f"sip:{domain}")
        return self.register(aor, 2, call_id, header, to=to, contact=contact, sent_by=sent_by)

    def wait_request(self, method: str, seconds: float = 5.0) -> SipMessage:
        """The next request of ``method`` (responses and other requests passed over)."""
        return self.wait_request_from(method, seconds)[0]

    def wait_request_from(self, method: str, seconds: float = 5.0) -> tuple[SipMessage, tuple[str, int]]:
        """The next request of ``method``, and the address it came from."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data, sender = self.sock.recvfrom(65535)
            msg = parse(data)
            if msg.is_request and msg.method == method:
                return msg, sender
        raise AssertionError(f"no {method} within {seconds} s")


def fast_pings(text: str, missed: int) -> str:
    """A lab config whose registrar pings UDP phones behind NAT every second and drops
    one after ``missed`` unanswered pings."""
    return text.replace("  algorithms:", f"  keepalive_interval: 1\n  keepalive_max_missed: {missed}\n"
                        "  algorithms:", 1)


def invite(caller: UdpPeer, router_port: int, aor: str, call_id: str) -> bytes:
    """A new call from ``caller`` (an ACD) to ``aor`` through the router."""
    return (f"INVITE sip:{aor}@127.0.0.1:{router_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{caller.port};branch=z9hG4bK-{call_id};rport\r\n"
            f"From: <sip:0909123456@acd.test>;tag=acd-{call_id}\r\nTo: <sip:{aor}@pbx.test>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:acd@127.0.0.1:{caller.port}>\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def answer(request: SipMessage, status: int = 200) -> bytes:
    """A phone's answer to ``request``: its Vias and Record-Route copied, a To tag, the
    Request-URI as Contact."""
    vias = "".join(f"Via: {v}\r\n" for v in request.all("via"))
    rr = "".join(f"Record-Route: {r}\r\n" for r in request.all("record-route"))
    return (f"SIP/2.0 {status} OK\r\n{vias}{rr}From: {request.header('from')}\r\n"
            f"To: {request.header('to')};tag=ph\r\nCall-ID: {request.call_id}\r\n"
            f"CSeq: {request.header('cseq')}\r\nContact: <{request.uri}>\r\nContent-Length: 0\r\n\r\n").encode()


def authorization(challenge: SipMessage, algorithm: str, username: str, password: str, uri: str,
                  method: str = "REGISTER") -> str:
    """The header line answering a 401 (Authorization) or 407 (Proxy-Authorization) with ``algorithm``."""
    proxy = challenge.status == 407
    assert challenge.status in (401, 407), challenge
    offers = {auth_params(v)[1].get("algorithm"): auth_params(v)[1]
              for v in challenge.all("proxy-authenticate" if proxy else "www-authenticate")}
    params = offers[algorithm]
    ha1 = digest.ha1(algorithm, username, params["realm"], password)
    response = digest.response(algorithm, ha1, params["nonce"], method, uri, "auth", "00000001", "c0ffee")
    return (f'{"Proxy-Authorization" if proxy else "Authorization"}: Digest username="{username}", '
            f'realm="{params["realm"]}", nonce="{params["nonce"]}", uri="{uri}", response="{response}", '
            f'algorithm={algorithm}, qop=auth, nc=00000001, cnonce="c0ffee"\r\n')
