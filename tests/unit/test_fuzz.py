"""Property-based fuzzing of the sans-IO SIP core (``SipCore``) with Hypothesis.

Properties, each over a fresh core built from one YAML policy (a trusted PBX,
a redirecting peer, users with registered devices, queues with hotlines, a
trunk with credentials) at a fixed clock and digest secret:

a. Arbitrary bytes, and SIP-looking text, into ``on_request`` and
   ``on_response`` never raise.
b. Mutated valid requests -- REGISTER with and without credentials, INVITE from
   the trusted PBX (fork, PSTN leg, redirect), from an authenticated device and
   from a stranger, OPTIONS, BYE, CANCEL, ACK, methods the router does not
   serve, unknown methods, and requests inside a call the router is forking or
   has connected -- with headers dropped, duplicated, truncated, reordered,
   renamed to compact form, folded, made huge or given odd values (URIs of
   other schemes, IPv6 literals, odd Via/CSeq/Max-Forwards/Content-Length/
   Expires/Contact/credentials), bare LF line ends and raw byte damage:
   never raise, and every request the router owes an answer gets exactly one.
c. Mutated responses to forwarded INVITEs (phones and the trunk, including
   challenges), interleaved with the caller's CANCEL and the timers, never
   raise, and the caller never gets two different final failures.

What "owes an answer" means (``owed``): a request other than ACK whose request
line is ``METHOD URI SIP/2.0`` and whose first Via (top entry), From, To,
Call-ID and CSeq parse -- even if something else in it is malformed (that is
answered 400).  What "answered" means (``check_request``): exactly one
response carrying the request's Call-ID and CSeq goes back toward the source
(the Via port, or the source port with rport; the same connection over TCP),
and it is

* a final response (status >= 200), or
* for an INVITE the router forks or sends to the trunk: 100 Trying, with the
  forwarded INVITE(s) in the same commands and no final yet (a retransmitted
  INVITE gets the last provisional or final again, nothing forwarded), or
* for a request inside a dialog the router connected: nothing, and the request
  forwarded toward the other party.

Never, for any input: an exception, a ``Log`` with event ``sip.core.error``
(the core's catch-all for a handler that raised), a ``Send`` to an impossible
address, a response to an ACK.

Bounded and reproducible by default: the normal run executes 600 + 2,000 + 800
examples (about 3,400; see ``EXAMPLES``) with ``derandomize=True`` and no
example database, so CI sees the same examples on every run.  For a deeper,
randomised run set ``SIP_ROUTER_FUZZ_EXAMPLES``: each property then runs that
many examples with a fresh random seed, e.g.

    SIP_ROUTER_FUZZ_EXAMPLES=50000 .venv/bin/python -m pytest -q tests/unit/test_fuzz.py

and a failure prints the ``@reproduce_failure`` blob that replays it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from router.config import parse_policy
from router.errors import MalformedMessage
from router.policy.model import Binding, DeviceKind
from router.sip import digest
from router.sip.commands import Command, Log, Send, Source
from router.sip.core import SipCore
from router.sip.forward import Local, forward_request, routes_after_me, via_destination
from router.sip.message import (
    COMPACT,
    SipMessage,
    auth_params,
    parse,
    parse_cseq,
    parse_name_addr,
    parse_via,
    split_list,
)

# ============================================================================ settings

_DEEP = int(os.environ.get("SIP_ROUTER_FUZZ_EXAMPLES", "0") or 0)
EXAMPLES = {"bytes": 600, "requests": 2000, "responses": 800}
WATCHDOG = 1.0          # seconds one call into the core may take before it counts as a hang


def fuzz_settings(prop: str) -> settings:
    return settings(max_examples=_DEEP or EXAMPLES[prop], derandomize=not _DEEP, database=None,
                    deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# ============================================================================ the world

NOW = 1000.0
SECRET = b"fuzz" * 8
LOCAL = Local("10.0.0.2", 5060)
POLICY = parse_policy("""
domain: pbx.test
trunk: {address: 10.9.9.9, port: 5080, username: acme, password: s3cret}
trusted_peers:
  - {name: acd, address: 10.0.0.1}
  - {name: redirector, address: 10.0.0.3, mode: redirect}
  - {name: acd6, address: "2001:db8::1"}
queues:
  - {id: support, hotline: "842873001234", dids: ["842873001235"]}
  - {id: sales, hotline: "842873009999"}
  - {id: nohot}
users:
  - id: minh
    extension: "1002"
    receive_method: all_devices
    agent_phone: "84987654321"
    default_queue: support
    ring_timeout: 5
    fallback: [agent_phone]
    devices:
      - {id: desk, kind: ip_phone, password: a}
      - {id: app, kind: app, password: b}
  - id: lan
    extension: "1001"
    receive_method: agent_phone
    agent_phone: "84912345678"
    default_queue: sales
    devices: [{id: lan-web, kind: web, password: c}]
  - id: hoa
    extension: "1003"
    receive_method: ip_phone
    default_queue: nohot
    fallback: []
    devices: [{id: hoa-desk, kind: ip_phone, password: d}]
""", "<fuzz>")
BINDINGS = [
    Binding("minh", "desk", DeviceKind.IP_PHONE, "sip:desk@10.1.1.1:7001", 1e9,
            source_host="10.1.1.1", source_port=7001),
    Binding("minh", "app", DeviceKind.APP, "sip:app@10.1.1.1:7002", 1e9,
            source_host="10.1.1.1", source_port=7002),
    Binding("lan", "lan-web", DeviceKind.WEB, "sip:lan-web@10.1.1.2:7003", 1e9,
            source_host="10.1.1.2", source_port=7003),
]
ACD = Source("10.0.0.1", 5060)
ACD_TCP = Source("10.0.0.1", 40123, "tcp", 7)
ACD6 = Source("2001:db8::1", 5060)
REDIRECTOR = Source("10.0.0.3", 5060)
DEVICE = Source("10.1.1.2", 7003)          # lan-web, registered
DESK = Source("10.1.1.1", 7001)
STRANGER = Source("192.0.2.66", 5099)
TRUNK = Source("10.9.9.9", 5080)


def new_core() -> SipCore:
    return SipCore(POLICY, list(BINDINGS), NOW, secret=SECRET, local=LOCAL)


# ============================================================================ messages as drafts

@dataclass
class Draft:
    """A message before rendering: start line, [name, value] headers, body."""

    start: str
    headers: list[list[str]]
    body: bytes = b""
    eol: str = "\r\n"
    folded: set[int] = field(default_factory=set)

    def render(self) -> bytes:
        lines = [self.start]
        for i, (name, value) in enumerate(self.headers):
            if i in self.folded and " " in value.strip():
                head, _, tail = value.strip().partition(" ")
                lines.append(f"{name}: {head}")
                lines.append(f" \t{tail}")
            else:
                lines.append(f"{name}: {value}")
        head = self.eol.join(lines) + self.eol + self.eol
        return head.encode("utf-8") + self.body


def request_draft(method: str, uri: str, via: str, from_: str, to: str, call_id: str, cseq: int,
                  extra: list[list[str]] | None = None, body: bytes = b"") -> Draft:
    headers = [["Via", via], ["From", from_], ["To", to], ["Call-ID", call_id],
               ["CSeq", f"{cseq} {method}"], ["Max-Forwards", "70"], *(extra or [])]
    if body:
        headers.append(["Content-Type", "application/sdp"])
    headers.append(["Content-Length", str(len(body))])
    return Draft(f"{method} {uri} SIP/2.0", headers, body)


def via_of(source: Source, branch: str, rport: bool = True) -> str:
    host = f"[{source.host}]" if ":" in source.host else source.host
    return (f"SIP/2.0/{source.transport.upper()} {host}:{source.port};branch=z9hG4bK{branch}"
            + (";rport" if rport else ""))


def credentials(header: str, method: str, uri: str, nonce: str, username: str, password: str,
                nc: str = "00000001") -> list[str]:
    ha1 = digest.ha1("MD5", username, "pbx.test", password)
    response = digest.response("MD5", ha1, nonce, method, uri, "auth", nc, "fuzzc")
    return [header, f'Digest username="{username}", realm="pbx.test", nonce="{nonce}", uri="{uri}", '
                    f'response="{response}", algorithm=MD5, qop=auth, nc={nc}, cnonce="fuzzc"']


def challenge_nonce(core: SipCore, method: str, source: Source) -> str:
    """A nonce the core issued, asked for the way a phone does (a request without credentials)."""
    uri = "sip:pbx.test" if method == "REGISTER" else "sip:1002@pbx.test"
    to = "<sip:lan@pbx.test>" if method == "REGISTER" else "<sip:1002@pbx.test>"
    draft = request_draft(method, uri, via_of(source, f"ch{method}"), "<sip:lan@pbx.test>;tag=ch",
                          to, f"challenge-{method}", 1)
    for command in core.on_request(draft.render(), source, NOW):
        if isinstance(command, Send) and command.data.startswith(b"SIP/2.0 40"):
            reply = parse(command.data)
            for name in ("www-authenticate", "proxy-authenticate"):
                for value in reply.all(name):
                    nonce = auth_params(value)[1].get("nonce")
                    if nonce:
                        return nonce
    raise AssertionError(f"no challenge to a {method} without credentials")


# ============================================================================ scenarios

@dataclass
class World:
    """What happened before the fuzzed request: which call the router has connected."""

    core: SipCore
    connected: set[str] = field(default_factory=set)      # Call-IDs with a dialog
    invites: set[tuple[str, ...]] = field(default_factory=set)   # transaction keys of INVITEs seen


def invite_key(via_branch: str, via_host: str, via_port: int | None, call_id: str, cseq: str,
               from_: str) -> tuple[str, ...]:
    """§17.2.3: branch and sent-by when the branch has the magic cookie, else the RFC 2543 fields."""
    if via_branch.startswith("z9hG4bK"):
        return (via_branch, via_host, str(via_port or 5060))
    return (call_id, cseq.split(" ")[0], from_)


def plain(method: str, uri: str = "sip:pbx.test", source: Source = ACD, to: str = "<sip:pbx.test>",
          tag_to: bool = False) -> Callable[[World], tuple[Draft, Source]]:
    def build(world: World) -> tuple[Draft, Source]:
        return request_draft(method, uri, via_of(source, f"{method.lower()}1"), "<sip:a@pbx.test>;tag=f1",
                             to + (";tag=t1" if tag_to else ""), f"fz-{method.lower()}", 1), source
    return build


def register(world: World) -> tuple[Draft, Source]:
    nonce = challenge_nonce(world.core, "REGISTER", DEVICE)
    draft = request_draft("REGISTER", "sip:pbx.test", via_of(DEVICE, "reg1"), "<sip:lan@pbx.test>;tag=r1",
                          "<sip:lan@pbx.test>", "fz-register", 2,
                          [["Contact", "<sip:lan-web@10.1.1.2:7003>;expires=600"], ["Expires", "600"],
                           ["User-Agent", "fuzz-phone/1.0"],
                           credentials("Authorization", "REGISTER", "sip:pbx.test", nonce, "lan-web", "c")])
    return draft, DEVICE


def register_without_credentials(world: World) -> tuple[Draft, Source]:
    return request_draft("REGISTER", "sip:pbx.test", via_of(DEVICE, "reg0"), "<sip:lan@pbx.test>;tag=r0",
                         "<sip:lan@pbx.test>", "fz-register0", 1,
                         [["Contact", "<sip:lan-web@10.1.1.2:7003>"], ["Expires", "3600"]]), DEVICE


def pbx_invite(user: str = "1002", to: str = "<sip:1002@pbx.test>", source: Source = ACD,
               extra: list[list[str]] | None = None, call_id: str = "fz-call",
               branch: str = "inv1") -> Draft:
    return request_draft("INVITE", f"sip:{user}@10.0.0.2", via_of(source, branch, rport=False),
                         "<sip:0909123456@10.0.0.1>;tag=c1", to, call_id, 1,
                         [["Contact", "<sip:0909123456@10.0.0.1:5060>"], *(extra or [])], b"v=0\r\n")


def invite_to_devices(world: World) -> tuple[Draft, Source]:
    return pbx_invite(), ACD


def invite_to_agent_phone(world: World) -> tuple[Draft, Source]:
    return pbx_invite("lan", "<sip:+842873001234@pbx.test;user=phone>", extra=[["X-Queue", "support"]]), ACD


def invite_redirected(world: World) -> tuple[Draft, Source]:
    return pbx_invite(source=REDIRECTOR), REDIRECTOR


def invite_over_tcp(world: World) -> tuple[Draft, Source]:
    return pbx_invite(source=ACD_TCP), ACD_TCP


def invite_over_ipv6(world: World) -> tuple[Draft, Source]:
    return pbx_invite(source=ACD6, to="<tel:+84-28-7300-1235>"), ACD6


def invite_from_device(world: World) -> tuple[Draft, Source]:
    nonce = challenge_nonce(world.core, "INVITE", DEVICE)
    return request_draft("INVITE", "sip:1002@pbx.test", via_of(DEVICE, "dev1"), "<sip:lan@pbx.test>;tag=d1",
                         "<sip:1002@pbx.test>", "fz-device-call", 2,
                         [["Contact", "<sip:lan-web@10.1.1.2:7003>"],
                          credentials("Proxy-Authorization", "INVITE", "sip:1002@pbx.test", nonce, "lan-web", "c")],
                         b"v=0\r\n"), DEVICE


def invite_from_stranger(world: World) -> tuple[Draft, Source]:
    return pbx_invite(source=STRANGER), STRANGER


def forked_call(answered: bool) -> Callable[[World], None]:
    """Prefix: the PBX's INVITE is forked to minh's phones; the desk phone rings (and answers)."""
    def prepare(world: World) -> None:
        out = world.core.on_request(pbx_invite().render(), ACD, NOW)
        world.invites.add(invite_key("z9hG4bKinv1", ACD.host, ACD.port, "fz-call", "1 INVITE", ""))
        desk = next(parse(c.data) for c in out if isinstance(c, Send) and c.port == 7001)
        world.core.on_response(answer(desk, 180, "dk"), DESK, NOW + 0.1)
        if answered:
            world.core.on_response(answer(desk, 200, "dk"), DESK, NOW + 0.2)
            world.connected.add("fz-call")
    return prepare


def in_call(method: str, answered: bool) -> Callable[[World], tuple[Draft, Source]]:
    def build(world: World) -> tuple[Draft, Source]:
        to = "<sip:1002@pbx.test>" + (";tag=dk" if answered and method != "CANCEL" else "")
        cseq = 1 if method in ("CANCEL", "ACK") else 2
        branch = "inv1" if method == "CANCEL" else f"{method.lower()}2"
        draft = request_draft(method, "sip:desk@10.1.1.1:7001" if answered else "sip:1002@10.0.0.2",
                              via_of(ACD, branch, rport=False), "<sip:0909123456@10.0.0.1>;tag=c1", to,
                              "fz-call", cseq, [["Route", "<sip:10.0.0.2:5060;lr>"]] if answered else [])
        return draft, ACD
    return build


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[World], tuple[Draft, Source]]
    prepare: Callable[[World], None] | None = None

    def __repr__(self) -> str:
        return self.name


SCENARIOS = [
    Scenario("register", register),
    Scenario("register-without-credentials", register_without_credentials),
    Scenario("invite-trusted-fork", invite_to_devices),
    Scenario("invite-trusted-agent-phone", invite_to_agent_phone),
    Scenario("invite-redirect-peer", invite_redirected),
    Scenario("invite-trusted-tcp", invite_over_tcp),
    Scenario("invite-trusted-ipv6", invite_over_ipv6),
    Scenario("invite-device", invite_from_device),
    Scenario("invite-stranger", invite_from_stranger),
    Scenario("options", plain("OPTIONS", source=STRANGER)),
    Scenario("bye-no-dialog", plain("BYE", "sip:desk@10.1.1.1:7001", tag_to=True)),
    Scenario("cancel-no-invite", plain("CANCEL", "sip:1002@10.0.0.2", to="<sip:1002@pbx.test>")),
    Scenario("ack-no-invite", plain("ACK", "sip:1002@10.0.0.2", tag_to=True)),
    *(Scenario(f"method-{m}", plain(m, tag_to=m in ("INFO", "PRACK")))
      for m in ("SUBSCRIBE", "MESSAGE", "INFO", "PRACK", "PUBLISH", "FOO", "X-Y.Z!")),
    *(Scenario(f"ringing-{m}", in_call(m, False), forked_call(False)) for m in ("CANCEL", "ACK", "BYE")),
    *(Scenario(f"connected-{m}", in_call(m, True), forked_call(True))
      for m in ("ACK", "BYE", "INVITE", "INFO", "UPDATE", "CANCEL")),
]


# ============================================================================ mutations

SCHEMES_AND_URIS = [
    "mailto:x@y", "tel:+842873001234", "tel:+84-28-7300-1234;phone-context=+84", "sips:1002@pbx.test",
    "urn:service:sos", "", "sip:", "sip:@", "sip:1002@", "sip:[::1]", "sip:1002@[2001:db8::1]:5060",
    "sip:1002@[2001:db8::1", "sip:1002@[]", "sip:1002@host:99999", "sip:1002@host:0", "sip:1002@host:abc",
    "sip:1002@host:\u00b2", "sip:" + "9" * 600 + "@h", "sip:%zz%41@h",
    "sip:1002@pbx.test;transport=tcp?subject=x",
    "SIP:1002@PBX.TEST", "sip:1002@10.0.0.2:5060;lr", "<sip:1002@pbx.test>", "sip:\u00e9@h\u00e9",
    "sip:1002@pbx.test;maddr=10.9.9.9", "sip:a:b:c@d:e:f",
]
NAME_ADDRS = [
    "<sip:a@pbx.test>;tag=1", "sip:a@pbx.test;tag=1", "<sip:a@pbx.test", "", "<>", "<mailto:x@y>;tag=1",
    "<tel:+842873001234>", "<sip:+842873001234@pbx.test;user=phone>",
    '"\u00dcn\u00efc\u00f6de" <sip:\u00fc@h>;tag=\u00fc',
    "<sip:a@pbx.test>;tag", "<sip:a@pbx.test>;tag=", "<urn:x>", "a" * 3000, '"unterminated <sip:a@b>',
    "<sip:a@b>;tag=1;tag=2", "<sip:a@b>, <sip:c@d>", "<sip:[2001:db8::1]:5060>;tag=6", ">",
]
POOLS: dict[str, list[str]] = {
    "Via": [
        "SIP/2.0/UDP 10.0.0.1:5060", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport",
        "SIP/2.0/UDP 10.0.0.1;rport=;received=", "SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bKv6",
        "SIP/2.0/UDP [2001:db8::1;branch=x", "SIP/2.0/UDP :5060;branch=z9hG4bK", "SIP/2.0/UDP host:0",
        "SIP/2.0/UDP host:65536", "SIP/2.0/UDP host:\u00b2", "SIP/3.0/UDP host", "SIP/2.0 host", "garbage", "",
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1, SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK2",
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1,garbage", "SIP/2.0/UDP 10.0.0.1:5060;rport=abc;received=x y",
        "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsr0000000000.1", "SIP/2.0/UDP h;branch=" + "z" * 3000,
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKinv1;rport=99999", "SIP/2.0/WS 10.0.0.1;branch=z9hG4bKws",
        "sip/2.0/udp 10.0.0.1:5060;branch=z9hG4bKlow", "SIP/2.0/UDP 10.0.0.1:5060 ; branch = z9hG4bKsp",
    ],
    "CSeq": ["1", "1 INVITE", "x INVITE", "-1 INVITE", "4294967296 INVITE", "99999999999 INVITE", "1 invite",
             "1  INVITE", "1 INVITE extra", "", "\u00b2 INVITE", "\u0661 INVITE", "0 INVITE", "2147483647 INVITE",
             "2147483648 INVITE", "1 ACK", "1 BYE", "1 CANCEL", "1 REGISTER", "1 FOO", "1 OPTIONS"],
    "Max-Forwards": ["0", "00", "1", "255", "256", "-1", "abc", "", "\u00b2", "\u0661", "70 70", "9" * 5000,
                     " 5 ", "0x10"],
    "Content-Length": ["0", "4", "5", "99", "-1", "abc", "", "\u00b2", "9" * 5000, "00004", "1 2", "+3"],
    "Expires": ["0", "60", "59", "3600", "99999999999", "-1", "abc", "", "\u00b2", "9" * 5000, "1.5",
                "\u0661\u0662\u0660", "Thu, 01 Dec 1994 16:00:00 GMT"],
    "Contact": ["*", "<sip:lan-web@10.1.1.2:7003>;expires=0", "<sip:x@h>;expires=\u00b2", "<sip:x@h>;q=2",
                "<sip:x@h>;q=nan", "<sip:x@h>;q=abc", "<sip:x@h>;q=1e999", "<mailto:x@y>", "<sip:x@h",
                "sip:x@h;expires=99999999999999999999999", "*, <sip:x@h>", "<sip:" + "a" * 300 + "@h>",
                "<tel:+84>", '<sip:x@[::1]>;+sip.instance="<urn:uuid:1>"', "",
                '"x" <sip:x@h>;expires=\u0663\u0660\u0660',
                "<sip:x@h>;expires=" + "9" * 5000, "<sip:lan-web@10.1.1.2:7003>;expires=0, *"],
    "From": NAME_ADDRS,
    "To": NAME_ADDRS,
    "Call-ID": ["", " ", "a" * 5000, "\u00fc@h", "x y", "fz-call", "fz-register"],
    "Route": ["<sip:10.0.0.2:5060;lr>", "<sip:10.0.0.2:5060;lr>, <sip:other@h;lr>", "<sip:broken", "garbage",
              "<mailto:x@y>", "", "<sip:10.0.0.2:5060;lr>, <sip:10.0.0.2;lr>, <sip:[::1]:99999;lr>", ","],
    "Record-Route": ["<sip:10.0.0.2:5060;lr>", "<sip:broken", ""],
    "X-Queue": ["support", "nope", "", " support ", "a" * 2000, "nohot"],
    "Authorization": ["Digest", "Digest username=", "Basic YWxhZGRpbjpvcGVuc2VzYW1l", "Digest realm=pbx.test",
                      'Digest username="lan-web", realm="pbx.test", nonce="x", uri="sip:pbx.test", response="\u00e9"',
                      'Digest username="nobody", realm="pbx.test", nonce="", uri="", response=""',
                      'Digest username="lan-web", realm="pbx.test", nonce="' + "A" * 40 + '", uri="u", response="r", '
                      'algorithm=SHA-512-256, qop=auth-int, nc=zz'],
    "Proxy-Authorization": ["Digest", 'Digest username="lan-web", realm="pbx.test", response="\u00e9"',
                            'Digest username="desk", realm="other", nonce="n", uri="u", response="r"'],
    "Reason": ['SIP;cause=200;text="x"', "", "\u00e9" * 100],
    "User-Agent": ["baresip v1.0", "", "\u00e9" * 500],
    "Content-Type": ["application/sdp", "", "multipart/mixed;boundary=x"],
}
CREDENTIAL_VALUES = ['""', "\u00e9" * 32, '"\u00e9"', "", "zz", '"', "00000000", "ffffffff", "auth-int",
                     '"auth,auth-int"', "SHA-512", "sha-256", "MD5-sess", "x" * 3000, '"a\\"b"', "=", ","]
COMPACT_OF = {full: short for short, full in COMPACT.items()}
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
INDEX = st.integers(0, 40)


def _setter(name: str) -> st.SearchStrategy[tuple[object, ...]]:
    return st.tuples(st.just("set"), st.just(name), st.one_of(st.sampled_from(POOLS[name]), TEXT))


MUTATION = st.one_of(
    st.tuples(st.just("drop"), INDEX),
    st.tuples(st.just("dup"), INDEX),
    st.tuples(st.just("truncate"), INDEX, st.integers(0, 30)),
    st.tuples(st.just("swap"), INDEX, INDEX),
    st.sampled_from(sorted(POOLS)).flatmap(_setter),
    st.sampled_from(sorted(POOLS)).flatmap(_setter).map(lambda op: ("add", *op[1:])),
    st.tuples(st.just("compact"), INDEX),
    st.tuples(st.just("rename"), INDEX, st.sampled_from(["upper", "lower", "space", "junk"])),
    st.tuples(st.just("huge"), INDEX, st.sampled_from([100, 1000, 5000])),
    st.tuples(st.just("uri"), st.one_of(st.sampled_from(SCHEMES_AND_URIS), TEXT)),
    st.tuples(st.just("method"), st.sampled_from(["INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS",
                                                  "FOO", "invite", "", "INV ITE", "PRACK"]), st.booleans()),
    st.tuples(st.just("body"), st.binary(max_size=60), st.sampled_from(["exact", "keep", "drop", "short"])),
    st.tuples(st.just("fold"), INDEX),
    st.tuples(st.just("eol"), st.sampled_from(["\n", "\r\n\n", "\r"])),
    st.tuples(st.just("credential"), st.sampled_from(["username", "realm", "nonce", "uri", "response", "algorithm",
                                                      "qop", "nc", "cnonce", "opaque"]),
              st.one_of(st.sampled_from(CREDENTIAL_VALUES), TEXT)),
    st.tuples(st.just("start"), st.sampled_from(["lower-version", "SIP/2.1", "extra-space", "trailing-space",
                                                 "leading-space", "tab", "no-version"])),
)
RAW = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 2000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2000), st.integers(1, 40)),
    st.tuples(st.just("cut"), st.integers(0, 2000)),
    st.tuples(st.just("latin1"), st.integers(0, 2000)),
)


def _canon(name: str) -> str:
    key = name.strip().lower()
    return COMPACT.get(key, key)


def mutate(draft: Draft, ops: list[tuple[object, ...]]) -> Draft:
    headers = [list(h) for h in draft.headers]
    start, body, eol, folded = draft.start, draft.body, draft.eol, set(draft.folded)
    for op in ops:
        kind = op[0]
        n = len(headers)
        if kind in ("drop", "dup", "truncate", "compact", "rename", "huge", "fold") and n == 0:
            continue
        i = int(op[1]) % n if n and isinstance(op[1], int) else 0
        if kind == "drop":
            del headers[i]
        elif kind == "dup":
            headers.insert(i + 1, list(headers[i]))
        elif kind == "truncate":
            headers[i][1] = headers[i][1][: int(op[2])]
        elif kind == "swap":
            j = int(op[2]) % n
            headers[i], headers[j] = headers[j], headers[i]
        elif kind in ("set", "add"):
            name, value = str(op[1]), str(op[2])
            found = [h for h in headers if _canon(h[0]) == name.lower()]
            if kind == "set" and found:
                found[0][1] = value
            else:
                headers.append([name, value])
        elif kind == "compact":
            short = COMPACT_OF.get(_canon(headers[i][0]))
            if short:
                headers[i][0] = short
        elif kind == "rename":
            style = op[2]
            name = headers[i][0]
            headers[i][0] = {"upper": name.upper(), "lower": name.lower(), "space": name + " ",
                             "junk": name + "\u00e9"}[str(style)]
        elif kind == "huge":
            headers[i][1] = headers[i][1] + "x" * int(op[2])
        elif kind == "uri":
            parts = start.split(" ")
            if len(parts) == 3:
                start = f"{parts[0]} {op[1]} {parts[2]}"
        elif kind == "method":
            method, with_cseq = str(op[1]), bool(op[2])
            start = method + start[start.find(" "):] if " " in start else start
            if with_cseq:
                for h in headers:
                    if _canon(h[0]) == "cseq":
                        h[1] = f"{h[1].split(' ')[0]} {method}"
                        break
        elif kind == "body":
            body, mode = bytes(op[1]), op[2]
            for h in headers:
                if _canon(h[0]) == "content-length":
                    h[1] = {"exact": str(len(body)), "keep": h[1], "drop": h[1],
                            "short": str(len(body) + 3)}[str(mode)]
            if mode == "drop":
                headers = [h for h in headers if _canon(h[0]) != "content-length"]
        elif kind == "credential":           # one parameter of the credentials changed in place
            key, value = str(op[1]), str(op[2])
            for h in headers:
                if _canon(h[0]) in ("authorization", "proxy-authorization"):
                    pattern = re.compile(rf'(\b{key}=)("[^"]*"|[^,\s]*)')
                    found = pattern.search(h[1])
                    h[1] = h[1][:found.start(2)] + value + h[1][found.end(2):] if found else f"{h[1]}, {key}={value}"
                    break
        elif kind == "fold":
            folded.add(i)
        elif kind == "eol":
            eol = str(op[1])
        elif kind == "start":
            m, _, rest = start.partition(" ")
            start = {"lower-version": start.replace("SIP/2.0", "sip/2.0"),
                     "SIP/2.1": start.replace("SIP/2.0", "SIP/2.1"), "extra-space": f"{m}  {rest}",
                     "trailing-space": start + " ", "leading-space": " " + start,
                     "tab": start.replace(" ", "\t", 1), "no-version": start.rsplit(" ", 1)[0]}[str(op[1])]
    return Draft(start, headers, body, eol, folded)


def damage(data: bytes, raw_ops: list[tuple[object, ...]]) -> bytes:
    for op in raw_ops:
        at = int(op[1]) % (len(data) + 1)
        if op[0] == "insert":
            data = data[:at] + bytes(op[2]) + data[at:]
        elif op[0] == "delete":
            data = data[:at] + data[at + int(op[2]):]
        elif op[0] == "cut":
            data = data[:at]
        elif op[0] == "latin1":
            data = data[:at] + b"\xe9" + data[at:]
    return data


# ============================================================================ the oracle

@dataclass(frozen=True)
class Owed:
    """A request the core owes exactly one answer."""

    method: str
    call_id: str
    cseq: str
    host: str
    port: int
    conn: int
    key: tuple[str, ...] = ()     # its transaction key (§17.2.3)


def _head_lines(data: bytes) -> list[str] | None:
    """The start line and header lines as RFC 3261 frames them, or None when that is ambiguous
    (no blank line, not UTF-8, folded lines in a malformed message)."""
    sep = data.find(b"\r\n\r\n")
    head = data[:sep] if sep >= 0 else data[:data.find(b"\n\n")] if b"\n\n" in data else None
    if head is None or b"\n\n" in head or b"\n\r\n" in head:
        return None                  # no blank line, or two candidates for it
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    if "\r" in text.replace("\r\n", "") or any(line[:1] in (" ", "\t") for line in lines[1:]):
        return None
    return lines


def owed(data: bytes, source: Source) -> tuple[Owed | None, str]:
    """Whether the core owes this request an answer (see the module docstring), and its method."""
    try:
        msg: SipMessage | None = parse(data)
    except MalformedMessage:
        msg = None
    if msg is not None:
        if not msg.is_request:
            return None, ""
        via, call_id, cseq = msg.top_via, msg.call_id, msg.header("cseq") or ""
        method, from_ = msg.method, msg.header("from") or ""
    else:
        lines = _head_lines(data)
        if lines is None:
            return None, ""
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] != "SIP/2.0" or not parts[0] or not parts[1]:
            return None, ""
        method = parts[0]
        first: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon and _canon(name) not in first:
                first[_canon(name)] = value.strip()
        if not {"via", "from", "to", "call-id", "cseq"} <= set(first):
            return None, method
        try:
            via = parse_via(split_list(first["via"])[0])
            parse_cseq(first["cseq"])
            parse_name_addr(first["from"])
            parse_name_addr(first["to"])
        except (ValueError, IndexError):
            return None, method
        call_id, cseq, from_ = first["call-id"], first["cseq"], first["from"]
    if method == "ACK":
        return None, method
    if source.transport != "udp":
        host, port = source.host, source.port
    else:
        host, port = source.host, source.port if "rport" in via.params else (via.port or 5060)
    key = invite_key(via.branch, via.host, via.port, call_id, cseq.strip(), from_)
    return Owed(method, call_id, cseq.strip(), host, port, source.conn, key), method


def sends(out: list[Command]) -> list[Send]:
    return [c for c in out if isinstance(c, Send)]


def check_sane(out: list[Command]) -> None:
    """Nothing the core asks the engine to do is impossible, and no handler raised."""
    errors = [c for c in out if isinstance(c, Log) and c.event == "sip.core.error"]
    assert not errors, "the core's catch-all fired:\n" + str(dict(errors[0].fields).get("traceback", errors[0]))
    for send in sends(out):
        assert send.host and not any(ch.isspace() for ch in send.host), f"Send to host {send.host!r}"
        assert 0 < send.port < 65536, f"Send to port {send.port}"
        assert send.transport in ("udp", "tcp"), send.transport
        if send.host.count(":") >= 2:
            ipaddress.ip_address(send.host)       # an IPv6 destination is an address, never "[...]"


def check_request(data: bytes, source: Source, out: list[Command], world: World) -> None:
    check_sane(out)
    expected, method = owed(data, source)
    parsed = []
    for send in sends(out):
        try:
            parsed.append((send, parse(send.data)))
        except MalformedMessage as exc:
            if send.data.startswith(b"SIP/2.0 ") and expected is None:
                continue      # a 400 echoing the broken header that made the request unaddressable
            raise AssertionError(f"the core sent a message its own parser refuses ({exc}):\n"
                                 f"{send.data[:600]!r}") from None
    if method == "ACK":
        acks = [m for _, m in parsed if not m.is_request and m.method == "ACK"]
        assert not acks, "an ACK was answered"
    if expected is None:
        return
    retransmission = expected.method == "INVITE" and expected.key in world.invites
    # a retransmitted INVITE is answered with the transaction's last response, whichever request
    # first used its branch (§17.2.3 matches on branch and sent-by alone)
    answers = [(s, m) for s, m in parsed if not m.is_request and (
        (m.call_id == expected.call_id and (m.header("cseq") or "") == expected.cseq)
        or (retransmission and (s.host, s.port) == (expected.host, expected.port)))]
    forwarded = [m for _, m in parsed if m.is_request and m.call_id == expected.call_id
                 and m.method == expected.method]
    statuses = [m.status for _, m in answers]
    for send, _ in answers:
        assert (send.host, send.port) == (expected.host, expected.port), \
            f"answer sent to {send.host}:{send.port}, not back to {expected.host}:{expected.port}"
        assert send.conn == expected.conn
    if not answers and forwarded and expected.call_id in world.connected:
        return                                      # in-dialog: passed on to the other party
    assert len(answers) == 1, f"{expected.method} got {len(answers)} answers {statuses}, wanted exactly one"
    status = statuses[0]
    if status >= 200:
        if expected.method == "INVITE":
            assert not [m for m in forwarded if m.header("cseq") == expected.cseq], \
                "an INVITE was answered finally and forwarded too"
        return
    assert expected.method == "INVITE", f"{expected.method} answered only {status}"
    assert retransmission or (status == 100 and forwarded), \
        f"INVITE answered {status} but nothing forwarded"


class Hang(AssertionError):
    """A core entry point ran longer than WATCHDOG seconds: an endless loop, most likely."""


@contextlib.contextmanager
def watchdog(what: str) -> Iterator[None]:
    """Fail (instead of hanging the test run) when one call into the core takes too long."""
    def expired(signum: int, frame: object) -> None:
        raise Hang(f"{what} did not return within {WATCHDOG:g} s (an endless loop?)")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _note(text: str) -> None:
    if currently_in_test_context():
        note(text)


def feed(entry: Callable[[bytes, Source, float], list[Command]], data: bytes, source: Source,
         now: float) -> list[Command]:
    _note(f"{entry.__name__}({data!r}, {source}, {now})")
    with watchdog(entry.__name__):
        return entry(data, source, now)


def tick(core: SipCore, now: float) -> list[Command]:
    _note(f"handle_timer({now})")
    with watchdog("handle_timer"):
        return core.handle_timer(now)


# ============================================================================ a. arbitrary bytes

FRAGMENTS = [
    "INVITE sip:1002@10.0.0.2 SIP/2.0", "REGISTER sip:pbx.test SIP/2.0", "SIP/2.0 200 OK", "SIP/2.0 180 Ringing",
    "SIP/2.0 407 Proxy Authentication Required", "\r\n", "\n", "\r\n\r\n", ": ", ";", ",", "<", ">", "\"",
    "Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsr0.1;rport", "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1",
    "v: SIP/2.0/TCP [::1]", "From: <sip:a@b>;tag=1", "f: sip:a@b", "To: <sip:1002@pbx.test>", "t: <tel:+84>",
    "Call-ID: fz", "i: fz", "CSeq: 1 INVITE", "CSeq: 1 REGISTER", "Content-Length: 0", "l: 10",
    "Max-Forwards: 0", "Contact: *", "Expires: 0", 'Proxy-Authenticate: Digest realm="x", nonce="n", qop="auth"',
    "Route: <sip:10.0.0.2:5060;lr>", "\u00e9", "\u00b2", "%00", "[2001:db8::1]", "9" * 50,
]
SIP_TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), TEXT), max_size=40).map(
    lambda parts: "".join(parts).encode("utf-8"))
SOURCES = [ACD, ACD_TCP, ACD6, DEVICE, STRANGER, TRUNK, REDIRECTOR]


@fuzz_settings("bytes")
@given(data=st.one_of(st.binary(max_size=2000), SIP_TEXT), as_request=st.booleans(),
       source=st.sampled_from(SOURCES))
def test_arbitrary_bytes_never_raise(data, as_request, source):
    core = new_core()
    if as_request:
        out = feed(core.on_request, data, source, NOW)
        check_request(data, source, out, World(core))
    else:
        check_sane(feed(core.on_response, data, source, NOW))
    check_sane(tick(core, NOW + 40.0))


# ============================================================================ b. mutated requests

@fuzz_settings("requests")
@given(scenario=st.sampled_from(SCENARIOS), ops=st.lists(MUTATION, max_size=4),
       raw=st.lists(RAW, max_size=2), raw_on=st.integers(0, 9),
       twice=st.booleans())
def test_mutated_requests_never_raise_and_are_answered_exactly_once(scenario, ops, raw, raw_on, twice):
    world = World(new_core())
    if scenario.prepare is not None:
        scenario.prepare(world)
    draft, source = scenario.build(world)
    data = mutate(draft, ops).render()
    if raw_on == 0:                                  # raw byte damage on one example in ten
        data = damage(data, raw)
    for attempt in range(2 if twice else 1):        # the second time: a retransmission
        out = feed(world.core.on_request, data, source, NOW + 1.0 + attempt)
        check_request(data, source, out, world)
        expected, _ = owed(data, source)
        if expected is not None and expected.method == "INVITE":
            world.invites.add(expected.key)
    check_sane(tick(world.core, NOW + 40.0))


# ============================================================================ c. mutated responses

def answer(request: SipMessage, status: int, tag: str = "dev", extra: list[list[str]] | None = None,
           reason: str = "") -> bytes:
    """A phone's (or the trunk's) response to a request the router sent it."""
    return response_draft(request, status, tag, extra, reason).render()


def response_draft(request: SipMessage, status: int, tag: str = "dev", extra: list[list[str]] | None = None,
                   reason: str = "") -> Draft:
    headers = [["Via", v] for v in request.all("via")]
    to = (request.header("to") or "") + (f";tag={tag}" if status > 100 else "")
    headers += [["From", request.header("from") or ""], ["To", to], ["Call-ID", request.call_id],
                ["CSeq", request.header("cseq") or ""], *(extra or []), ["Content-Length", "0"]]
    return Draft(f"SIP/2.0 {status} {reason or 'Whatever'}", headers)


CHALLENGES = [
    'Digest realm="carrier", nonce="n1", qop="auth", algorithm=MD5',
    'Digest realm="carrier", nonce="n1", qop="auth-int,auth", algorithm=SHA-256, opaque="o"',
    'Digest realm="carrier"', "Digest nonce=", "Basic realm=x", "", "Digest " + "a=b, " * 200,
    'Digest realm="\u00e9", nonce="\u00e9", algorithm=MD5', 'Digest realm="carrier", nonce="n", algorithm=MD5-sess',
]
STATUSES = [100, 180, 183, 199, 200, 202, 299, 300, 302, 401, 403, 404, 407, 408, 480, 486, 487, 500, 503,
            600, 603, 699, 999]
STEP = st.one_of(
    st.tuples(st.just("response"), INDEX, st.sampled_from(STATUSES), st.sampled_from(["dev", "t2", ""]),
              st.lists(MUTATION, max_size=3), st.sampled_from(CHALLENGES + [None]), st.booleans()),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("timer"), st.sampled_from([0.5, 1.0, 4.0, 5.0, 6.0, 32.0, 40.0, 200.0])),
    st.tuples(st.just("caller-retransmits")),
    st.tuples(st.just("caller-acks")),
)
CALLS = {
    "fork": (lambda: pbx_invite(), ACD),
    "agent-phone": (lambda: pbx_invite("lan", "<tel:+842873001234>"), ACD),
    "fork-tcp": (lambda: pbx_invite(source=ACD_TCP), ACD_TCP),
}


@fuzz_settings("responses")
@given(call=st.sampled_from(sorted(CALLS)), steps=st.lists(STEP, min_size=1, max_size=6))
def test_mutated_responses_to_forwarded_invites_never_raise(call, steps):
    core = new_core()
    build, caller = CALLS[call]
    invite = build().render()
    out = feed(core.on_request, invite, caller, NOW)
    check_sane(out)
    branches = [(s, parse(s.data)) for s in sends(out) if not s.data.startswith(b"SIP/2.0")]
    assert branches, "the clean INVITE was not forwarded"
    finals: list[tuple[float, int]] = []
    strays = []          # responses with our sent-by that match no branch: forwarded statelessly (§16.7)
    now = NOW

    def collect(commands: list[Command]) -> None:
        check_sane(commands)
        for send in sends(commands):
            try:
                message = parse(send.data)
            except MalformedMessage as exc:
                raise AssertionError(f"the core sent a message its own parser refuses ({exc}):\n"
                                     f"{send.data[:600]!r}") from None
            if not message.is_request:
                if send.host == caller.host and send.port == caller.port and message.method == "INVITE" \
                        and message.status >= 200:
                    finals.append((now, message.status))
            elif message.method == "INVITE":
                branches.append((send, message))

    for step in steps:
        now += 0.05
        if step[0] == "response":
            _, which, status, tag, ops, challenge, from_trunk = step
            send, request = branches[int(which) % len(branches)]
            extra = [["Proxy-Authenticate" if status == 407 else "WWW-Authenticate", challenge]] \
                if challenge is not None and status in (401, 407) else []
            data = mutate(response_draft(request, int(status), str(tag), extra), list(ops)).render()
            source = Source(send.host, send.port, send.transport, send.conn)
            strays += [data] if _stray(data, branches) else []
            collect(feed(core.on_response, data, source, now))
        elif step[0] == "cancel":
            cancel = invite.replace(b"INVITE sip", b"CANCEL sip").replace(b"1 INVITE", b"1 CANCEL")
            collect(feed(core.on_request, cancel, caller, now))
        elif step[0] == "timer":
            now += float(step[1])
            collect(tick(core, now))
        elif step[0] == "caller-acks":
            if finals:                               # the ACK of the final failure, same branch (§17.1.1.3)
                ack = invite.replace(b"INVITE sip", b"ACK sip").replace(b"1 INVITE", b"1 ACK")
                check_sane(feed(core.on_request, ack, caller, now))
        elif not finals and now < NOW + 30.0:        # a caller retransmits only until an answer, < Timer B
            check_sane(feed(core.on_request, invite, caller, now))
    for _ in range(50):                              # let every timer run out
        due = core.next_timer()
        if due > now + 400:
            break
        now = max(now, due)
        collect(tick(core, now))
    # While the proxy remembers the call (32 s after the caller's first final response), the caller
    # hears one final failure at most, maybe repeated, and none after a 2xx.  Later responses match
    # no transaction and are forwarded statelessly (§16.7), as are responses naming no branch we sent.
    if finals and not strays:
        window = [(at, status) for at, status in finals if at < finals[0][0] + 32.0]
        answered = next((at for at, status in window if status < 300), None)
        failures = [(at, status) for at, status in window if status >= 300]
        assert len({status for at, status in failures if answered is None or at <= answered}) <= 1, \
            f"the caller got several final failures: {finals}"
        assert answered is None or not [at for at, _ in failures if at > answered], \
            f"a final failure followed the 2xx: {finals}"


def _stray(data: bytes, branches: list[tuple[Send, SipMessage]]) -> bool:
    """A response naming us in its top Via whose branch is none we sent."""
    try:
        via = parse(data).top_via
    except MalformedMessage:
        return False
    ours = {request.top_via.branch for _, request in branches}
    return (via.host, via.port or 5060) == (LOCAL.host, LOCAL.port) and via.branch not in ours


# ============================================================================ the harness itself

def test_the_oracle_owes_well_formed_requests_an_answer_and_acks_none():
    draft = pbx_invite()
    expected, method = owed(draft.render(), ACD)
    assert expected == Owed("INVITE", "fz-call", "1 INVITE", "10.0.0.1", 5060, 0,
                            ("z9hG4bKinv1", "10.0.0.1", "5060")) and method == "INVITE"
    ack = mutate(draft, [("method", "ACK", True)]).render()
    assert owed(ack, ACD) == (None, "ACK")
    broken = mutate(draft, [("set", "Content-Length", "99")]).render()
    assert owed(broken, ACD)[0] is not None               # malformed, but addressable: 400 owed
    assert owed(mutate(draft, [("set", "Via", "garbage")]).render(), ACD)[0] is None
    framed_twice = broken.replace(b"\r\nFrom", b"\n\nFrom", 1)       # which blank line ends it?
    assert owed(framed_twice, ACD)[0] is None


@pytest.mark.parametrize("scenario", SCENARIOS, ids=repr)
def test_every_unmutated_scenario_is_answered_as_the_oracle_says(scenario):
    world = World(new_core())
    if scenario.prepare is not None:
        scenario.prepare(world)
    draft, source = scenario.build(world)
    data = draft.render()
    out = world.core.on_request(data, source, NOW + 1.0)
    check_request(data, source, out, world)


# ============================================================================ what the fuzzing found

def test_the_timers_return_when_a_cancelled_fork_has_a_phone_that_never_answers_our_cancel():
    """Found by ``test_mutated_responses_to_forwarded_invites_never_raise``.  The caller
    cancels before the app has rung; the app then rings, so our CANCEL goes out late and
    is never answered.  When the call's linger time (32 s after the 487) passes before
    that branch's Timer B, ``handle_timer`` must still return."""
    core = new_core()
    out = core.on_request(pbx_invite().render(), ACD, NOW)
    app = next(parse(c.data) for c in sends(out) if c.port == 7002)
    cancel = pbx_invite().render().replace(b"INVITE sip", b"CANCEL sip").replace(b"1 INVITE", b"1 CANCEL")
    core.on_request(cancel, ACD, NOW + 0.05)
    core.on_response(answer(app, 180, "a"), Source("10.1.1.1", 7002), NOW + 0.1)
    now = NOW + 0.1
    while now < NOW + 250.0:
        now = max(now, core.next_timer())
        check_sane(tick(core, now))
        now += 0.01


def test_an_empty_or_broken_route_is_passed_on_not_an_error():
    """Found by fuzzing: ``routes_after_me`` raised on a Route entry that is no name-addr
    (the ACK of a connected call with ``Route:`` empty hit the core's catch-all)."""
    for route in ("", "<sip:broken", "<sip:10.0.0.2:5060;lr>, garbage"):
        msg = parse(mutate(pbx_invite(), [("add", "Route", route)]).render())
        kept = routes_after_me(msg, LOCAL)
        assert kept == [r for r in msg.all("route") if r != "<sip:10.0.0.2:5060;lr>"]


def test_a_forwarded_request_carries_one_max_forwards_one_less():
    msg = parse(mutate(pbx_invite(), [("dup", 5)]).render())          # Max-Forwards: 70 twice
    assert msg.all("max-forwards") == ["70", "70"]
    forwarded = parse(forward_request(msg, "sip:desk@10.1.1.1:7001", LOCAL, "z9hG4bKsrx", "udp", ("10.0.0.1", 5060)))
    assert forwarded.all("max-forwards") == ["69"]


@pytest.mark.parametrize("via, destination", [
    ("SIP/2.0/UDP 10.0.0.1:5060;rport=99999;received=10.9.9.9", ("10.9.9.9", 5060)),
    ("SIP/2.0/UDP 10.0.0.1:5060;rport=abc;received=x y", ("10.0.0.1", 5060)),
    ("SIP/2.0/UDP 10.0.0.1;rport=\u00b2", ("10.0.0.1", 5060)),
    ("SIP/2.0/UDP [2001:db8::1]:5070;rport=5071;received=[2001:db8::2]", ("2001:db8::2", 5071)),
    ("SIP/2.0/UDP 10.0.0.1:5060;rport=0", ("10.0.0.1", 5060)),
])
def test_a_response_goes_back_to_an_address_and_a_port_that_exist(via, destination):
    """``received`` must be an address and ``rport`` a port; otherwise the sent-by is used."""
    assert via_destination(via) == destination


def test_credentials_in_an_algorithm_we_never_offer_are_challenged_again():
    """Found by fuzzing: ``algorithm=SHA-512-256`` made ``digest.ha1`` raise KeyError (a 500)."""
    core = new_core()
    draft, source = register(World(core))
    data = mutate(draft, [("credential", "algorithm", "SHA-512-256")]).render()
    out = core.on_request(data, source, NOW + 1.0)
    check_request(data, source, out, World(core))
    assert [parse(s.data).status for s in sends(out)] == [401]


@pytest.mark.parametrize("second_via", ["", "garbage", "SIP/2.0/UDP [2001:db8::1"])
def test_a_response_whose_next_via_does_not_parse_is_not_forwarded(second_via):
    """Found by fuzzing (50,000 examples): §16.7 step 3 forwards a response along the Via
    after ours; when that Via is unusable, sending the response on gives the caller a
    message without a valid top Via.  The branch may still count it; nothing malformed
    may leave the router."""
    core = new_core()
    out = core.on_request(pbx_invite().render(), ACD, NOW)
    desk = next(parse(c.data) for c in sends(out) if c.port == 7001)
    ringing = answer(desk, 180, "d").replace(b"\r\nFrom:", f"\r\nVia: {second_via}\r\nFrom:".encode(), 1)
    ringing = ringing.replace(f"Via: {desk.all('via')[1]}\r\n".encode(), b"", 1)   # the caller's Via is gone
    for send in sends(core.on_response(ringing, DESK, NOW + 0.1)):
        parse(send.data)                # raises MalformedMessage for a broken top Via
