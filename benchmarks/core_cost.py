#!/usr/bin/env python3
"""CPU time the pure SIP core spends per registration and per call, in process.

No sockets, no PJSIP: the core (``router.sip.core.SipCore``) is fed the same
datagrams the SIPp scenarios of ``compare.py`` send -- a REGISTER with digest
(REGISTER, 401, REGISTER with credentials, 200), a single-target call (INVITE,
100, 180, 200, ACK, BYE, 200) and a forked call (two phones ring, one answers,
the other is cancelled) -- and the time inside ``on_request`` / ``on_response``
is summed; the best of three runs is printed.  The client side (computing the digest, building the phones'
answers) is outside the timed part.  It prints microseconds per operation:
the Python share of the router's cost per message, to compare before and
after a change to the core, without the noise of a loaded machine.

    .venv/bin/python benchmarks/core_cost.py --users 100000 --rounds 20000
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.config import parse_policy  # noqa: E402
from router.policy.model import Binding, DeviceKind  # noqa: E402
from router.sip.commands import Command, Send, Source  # noqa: E402
from router.sip.core import SipCore  # noqa: E402
from router.sip.forward import Local  # noqa: E402
from router.sip.message import SipMessage, build_response, parse  # noqa: E402
from router.sip.uac_auth import credentials_header  # noqa: E402

DOMAIN = "pbx.test"
LOCAL = Local("127.0.0.1", 5060)
ACD = Source("127.0.0.1", 5999)
PHONE_HOST = "127.0.0.2"
REPEATS = 3
RATE = 500              # operations per second of simulated time: timers fire as they would
WARM_UP = 40.0          # simulated seconds before measuring: longer than a call lingers after its end


def policy_text(users: int, method: str) -> str:
    lines = [f"domain: {DOMAIN}",
             "registrar: {max_bindings_per_device: 1, source_failures_per_minute: 100000000}",
             "routing: {fallback: [], ring_timeout: 30}",
             "trusted_peers: [{name: acd, address: 127.0.0.1}]", "users:"]
    for i in range(users):
        lines.append(f"  - {{id: u{i}, extension: '{10000 + i}', receive_method: {method}, devices: ["
                     f"{{id: a{i}, kind: ip_phone, password: p{i}}}, {{id: b{i}, kind: app, password: p{i}}}]}}")
    return "\n".join(lines) + "\n"


class Timed:
    """The core, with the time spent inside it summed."""

    def __init__(self, core: SipCore) -> None:
        self.core = core
        self.spent = 0.0
        self.now = 1000.0

    def request(self, data: bytes, source: Source) -> list[Command]:
        return self._timed(self.core.on_request, data, source)

    def response(self, data: bytes, source: Source) -> list[Command]:
        return self._timed(self.core.on_response, data, source)

    def _timed(self, handler: Callable[[bytes, Source, float], list[Command]], data: bytes,
               source: Source) -> list[Command]:
        started = time.perf_counter()
        out = handler(data, source, self.now)
        self._timers()
        self.spent += time.perf_counter() - started
        return out

    def _timers(self) -> None:
        """What the engine does after each message: run the core's timers when they are due."""
        if self.core.next_timer() <= self.now:
            self.core.handle_timer(self.now)


def sends(commands: list[Command], port: int | None = None) -> list[SipMessage]:
    return [parse(c.data) for c in commands if isinstance(c, Send) and (port is None or c.port == port)]


def register(timed: Timed, i: int, round_no: int) -> None:
    user, device = f"u{i}", f"a{i}"
    port = 20000 + i % 40000
    head = (f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {PHONE_HOST}:{port};branch=z9hG4bK-r{round_no}-{{cseq}};rport\r\n"
            f"From: <sip:{user}@{DOMAIN}>;tag=t{round_no}\r\nTo: <sip:{user}@{DOMAIN}>\r\n"
            f"Call-ID: reg-{round_no}\r\nCSeq: {{cseq}} REGISTER\r\n"
            f"Contact: <sip:{device}-{round_no}@{PHONE_HOST}:{port}>\r\n{{auth}}Expires: 300\r\n"
            "Max-Forwards: 70\r\nUser-Agent: SIPp\r\nContent-Length: 0\r\n\r\n")
    source = Source(PHONE_HOST, port)
    (challenge,) = sends(timed.request(head.format(cseq=1, auth="").encode(), source))
    assert challenge.status == 401, challenge.status
    found = credentials_header(challenge, "REGISTER", f"sip:{DOMAIN}", device, f"p{i}")
    assert found is not None
    name, value = found
    (ok,) = sends(timed.request(head.format(cseq=2, auth=f"{name}: {value}\r\n").encode(), source))
    assert ok.status == 200, ok.status


def answer(request: SipMessage, status: int, tag: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    headers = [(n, v) for n, v in (("Record-Route", ", ".join(request.all("record-route"))),) if v]
    reason = {180: "Ringing", 200: "OK"}.get(status, "Request Terminated")
    return build_response(request, status, reason, ("127.0.0.1", 5060), tag, [*headers, *extra], server="phone")


def call(timed: Timed, i: int, round_no: int, fork: bool) -> None:
    call_id = f"call-{round_no}"
    invite = (f"INVITE sip:u{i}@127.0.0.1:5060 SIP/2.0\r\n"
              f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-c{round_no}\r\n"
              f"From: <sip:caller@127.0.0.1>;tag=c{round_no}\r\nTo: <sip:u{i}@{DOMAIN}>\r\n"
              f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@127.0.0.1:5999>\r\n"
              "Max-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n").encode()
    out = sends(timed.request(invite, ACD))
    legs = [m for m in out if m.is_request]
    assert len(legs) == (2 if fork else 1), [m.uri for m in legs]
    phone = Source(PHONE_HOST, 7000)
    for leg in legs:
        timed.response(answer(leg, 180, f"p{leg.uri[4]}"), phone)
    winner = legs[0]
    contact = (("Contact", f"<{winner.uri}>"),)
    ok = sends(timed.response(answer(winner, 200, f"p{winner.uri[4]}", contact), phone))
    (final,) = [m for m in ok if m.status == 200]
    cancels = [m for m in ok if m.is_request and m.method == "CANCEL"]
    assert len(cancels) == len(legs) - 1
    for cancel, loser in zip(cancels, legs[1:], strict=True):     # the other phone: 200 to CANCEL, 487 to the INVITE
        timed.response(answer(cancel, 200, f"p{loser.uri[4]}"), phone)
        timed.response(answer(loser, 487, f"p{loser.uri[4]}"), phone)
    rr = final.all("record-route")
    route = "".join(f"Route: {r}\r\n" for r in rr)
    tags = f"From: <sip:caller@127.0.0.1>;tag=c{round_no}\r\nTo: {final.header('to')}\r\nCall-ID: {call_id}\r\n"
    ack = (f"ACK {winner.uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-a{round_no}\r\n{tags}"
           f"CSeq: 1 ACK\r\n{route}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
    timed.request(ack, ACD)
    bye = (f"BYE {winner.uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-b{round_no}\r\n{tags}"
           f"CSeq: 2 BYE\r\n{route}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
    (forwarded,) = [m for m in sends(timed.request(bye, ACD)) if m.is_request]
    (done,) = sends(timed.response(answer(forwarded, 200, "x"), phone))
    assert done.status == 200


def bindings(users: int) -> list[Binding]:
    out = []
    for i in range(users):
        for device, kind, port in ((f"a{i}", DeviceKind.IP_PHONE, 30000), (f"b{i}", DeviceKind.APP, 40000)):
            out.append(Binding(f"u{i}", device, kind, f"sip:{device}@{PHONE_HOST}:{port + i % 20000}", 1e12,
                               source_host=PHONE_HOST, source_port=port + i % 20000))
    return out


def measure(name: str, users: int, rounds: int, method: str, step: Callable[[Timed, int, int], None]) -> None:
    policy = parse_policy(policy_text(users, method), "bench.yaml")
    timed = Timed(SipCore(policy, bindings(users) if name != "register" else [], 1000.0,
                          secret=b"s" * 32, local=LOCAL))
    gc.collect()
    gc.freeze()
    round_no = 0
    while timed.now < 1000.0 + WARM_UP:          # until ended calls are forgotten as fast as new ones come
        step(timed, round_no % users, round_no)
        timed.now += 1 / RATE
        round_no += 1
    best = []
    for _ in range(REPEATS):                     # the best of three: the least disturbed by the machine
        timed.spent = 0.0
        for _ in range(rounds):
            step(timed, round_no % users, round_no)
            timed.now += 1 / RATE
            round_no += 1
        best.append(timed.spent / rounds * 1e6)
    print(f"{name:9} {min(best):8.1f} us per {'registration' if name == 'register' else 'call'} "
          f"(runs: {', '.join(f'{b:.1f}' for b in best)})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--only", default="register,single,fork")
    args = parser.parse_args()
    chosen = args.only.split(",")
    if "register" in chosen:
        measure("register", args.users, args.rounds, "ip_phone", register)
    if "single" in chosen:
        measure("single", args.users, args.rounds, "ip_phone", lambda t, i, r: call(t, i, r, False))
    if "fork" in chosen:
        measure("fork", args.users, args.rounds, "all_devices", lambda t, i, r: call(t, i, r, True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
