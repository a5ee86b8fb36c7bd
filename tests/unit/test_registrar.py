"""The registrar as a pure state machine: messages and the clock in, replies out."""

from __future__ import annotations

import itertools

import pytest

from router.config import parse_policy
from router.policy.model import DeviceKind
from router.sip import digest
from router.sip.commands import Source
from router.sip.location import ownership_moves
from router.sip.message import auth_params, parse
from router.sip.registrar import Registrar

POLICY = """
domain: pbx.test
registrar: {min_expires: 60, max_expires: 3600, default_expires: 600, max_auth_failures: 2,
            max_bindings_per_device: 2, max_bindings_per_aor: 3, nonce_ttl: 30,
            source_failures_per_minute: 5}
users:
  - id: minh
    extension: "1002"
    devices:
      - {id: minh-desk, kind: ip_phone, password: s1}
      - {id: minh-app, kind: app, password: s2}
  - id: lan
    devices:
      - {id: lan-desk, kind: ip_phone, password: s3}
"""
SRC = Source("10.0.0.5", 5062)
_n = itertools.count()


@pytest.fixture
def reg(tmp_path):
    return Registrar(parse_policy(POLICY, str(tmp_path / "r.yaml")), [], now=1000.0, secret=b"k" * 32)


def request(aor="1002", contacts=("<sip:minh@10.0.0.5:5062>",), expires="300", auth="",
            call_id="call-1", cseq=1, user_agent=""):
    lines = ["REGISTER sip:pbx.test SIP/2.0", f"Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK{next(_n)}",
             f"From: <sip:{aor}@pbx.test>;tag=f", f"To: <sip:{aor}@pbx.test>", f"Call-ID: {call_id}",
             f"CSeq: {cseq} REGISTER"]
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if auth:
        lines.append(auth)
    if user_agent:
        lines.append(f"User-Agent: {user_agent}")
    return parse(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())


def authorization(reg, user, password, now, algorithm="MD5", nc="00000001"):
    nonce = reg.nonces.issue(now)
    ha1 = digest.ha1(algorithm, user, "pbx.test", password)
    resp = digest.response(algorithm, ha1, nonce, "REGISTER", "sip:pbx.test", "auth", nc, "cn")
    return (f'Authorization: Digest username="{user}", realm="pbx.test", nonce="{nonce}", '
            f'uri="sip:pbx.test", response="{resp}", algorithm={algorithm}, qop=auth, nc={nc}, cnonce="cn"')


def register(reg, now=1000.0, user="minh-desk", password="s1", **kw):
    return reg.register(request(auth=authorization(reg, user, password, now), **kw), SRC, now)


def test_no_credentials_is_challenged_with_md5_then_sha256(reg):
    out = reg.register(request(), SRC, 1000.0)
    assert out.reply.status == 401 and out.save is None
    algorithms = [auth_params(v)[1]["algorithm"] for n, v in out.reply.headers if n == "WWW-Authenticate"]
    assert algorithms == ["MD5", "SHA-256"]


def test_an_agent_that_aborts_on_sha256_is_challenged_with_md5_only(reg):
    out = reg.register(request(user_agent="baresip v1.0.0 (x86_64/linux)"), SRC, 1000.0)
    assert [v for n, v in out.reply.headers if n == "WWW-Authenticate"][0].count("algorithm=") == 1
    assert len([1 for n, _ in out.reply.headers if n == "WWW-Authenticate"]) == 1


def test_the_device_decides_user_and_kind_and_the_binding_keeps_its_source(reg):
    out = register(reg, user="minh-app", password="s2")
    assert out.reply.status == 200
    (binding,) = out.save.bindings
    assert (binding.user_id, binding.device_id, binding.kind.value) == ("minh", "minh-app", "app")
    assert (binding.source_host, binding.source_port, binding.transport) == ("10.0.0.5", 5062, "udp")
    assert binding.expires_at == 1300.0


def test_sha256_credentials_are_accepted(reg):
    auth = authorization(reg, "minh-desk", "s1", 1000.0, "SHA-256")
    assert reg.register(request(auth=auth), SRC, 1000.0).reply.status == 200


def test_bad_credentials_are_challenged_again_then_forbidden(reg):
    assert register(reg, password="x").reply.status == 401
    assert register(reg, password="x").reply.status == 403
    assert register(reg, password="s1").reply.status == 403     # locked for a while
    assert reg.bindings(1000.0) == []
    assert register(reg, now=1061.0, password="s1").reply.status == 200   # the lockout ends


def test_a_stale_nonce_gets_a_fresh_challenge_with_stale_true(reg):
    auth = authorization(reg, "minh-desk", "s1", 1000.0)
    out = reg.register(request(auth=auth), SRC, 1031.0)
    assert out.reply.status == 401
    assert any("stale=true" in v for n, v in out.reply.headers if n == "WWW-Authenticate")


def test_a_source_sending_many_bad_credentials_is_throttled(reg):
    for user in ("minh-desk", "minh-app", "lan-desk", "ghost", "nobody"):
        register(reg, user=user, password="guess", aor="lan")
    out = reg.register(request(), SRC, 1001.0)
    assert (out.reply.status, out.reply.reason) == (403, "Too Many Failed Attempts")
    assert reg.register(request(), Source("10.0.0.6", 5060), 1001.0).reply.status == 401


def test_a_device_may_register_only_its_own_users_aor(reg):
    out = register(reg, aor="lan")
    assert out.reply.status == 403 and out.save is None


def test_the_extension_is_the_same_aor_as_the_user_id(reg):
    assert register(reg, aor="minh").reply.status == 200


def test_the_contact_expires_param_beats_the_header_and_is_clamped(reg):
    out = register(reg, contacts=("<sip:a@10.0.0.5>;expires=120", "<sip:b@10.0.0.5>;expires=99999"),
                   expires="300")
    assert sorted(b.expires_at for b in out.save.bindings) == [1120.0, 4600.0]


def test_no_expires_anywhere_uses_the_default(reg):
    out = register(reg, expires=None)
    assert out.save.bindings[0].expires_at == 1600.0


def test_a_too_brief_expiry_is_423_with_min_expires(reg):
    out = register(reg, expires="30")
    assert out.reply.status == 423 and ("Min-Expires", "60") in out.reply.headers


def test_star_with_expires_zero_removes_the_devices_bindings_only(reg):
    register(reg)
    register(reg, user="minh-app", password="s2", contacts=("<sip:app@10.0.0.7>",), call_id="c2")
    out = register(reg, contacts=("*",), expires="0", call_id="c3")
    assert out.reply.status == 200 and out.save.bindings == ()
    assert [b.device_id for b in reg.bindings(1000.0, "minh")] == ["minh-app"]


def test_star_without_expires_zero_is_400(reg):
    assert register(reg, contacts=("*",), expires="300").reply.status == 400


def test_expires_zero_on_one_contact_removes_just_that_one(reg):
    register(reg, contacts=("<sip:a@10.0.0.5>", "<sip:b@10.0.0.5>"))
    out = register(reg, contacts=("<sip:a@10.0.0.5>",), expires="0", cseq=2)
    assert [b.contact for b in out.save.bindings] == ["sip:b@10.0.0.5"]


def test_an_older_cseq_for_the_same_call_id_is_refused(reg):
    register(reg, cseq=5)
    assert register(reg, cseq=4).reply.status == 400
    assert register(reg, cseq=6).reply.status == 200


def test_a_device_keeps_its_newest_bindings_up_to_the_cap(reg):
    for i, at in enumerate((1000.0, 1001.0, 1002.0)):
        register(reg, now=at, contacts=(f"<sip:c{i}@10.0.0.5>",), call_id=f"c{i}")
    assert sorted(b.contact for b in reg.bindings(1003.0, "minh")) == ["sip:c1@10.0.0.5", "sip:c2@10.0.0.5"]


def test_a_user_over_the_aor_cap_is_refused(reg):
    register(reg, contacts=("<sip:a@1.1.1.1>", "<sip:b@1.1.1.1>"))
    out = register(reg, user="minh-app", password="s2", contacts=("<sip:c@1.1.1.1>", "<sip:d@1.1.1.1>"),
                   call_id="other")
    assert out.reply.status == 403 and "limit is 3" in dict(out.reply.headers)["Warning"]


def test_the_200_lists_every_binding_of_the_user_with_remaining_time(reg):
    register(reg, contacts=("<sip:a@1.1.1.1>",))
    out = register(reg, now=1100.0, user="minh-app", password="s2", contacts=("<sip:b@1.1.1.1>;q=0.5",),
                   call_id="x")
    contacts = sorted(v for n, v in out.reply.headers if n == "Contact")
    assert contacts == ["<sip:a@1.1.1.1>;expires=200", "<sip:b@1.1.1.1>;expires=300;q=0.5"]


def test_the_same_instance_from_a_new_address_replaces_the_old_binding(reg):
    register(reg, contacts=('<sip:m@10.0.0.5>;+sip.instance="<urn:uuid:1>"',))
    out = register(reg, contacts=('<sip:m@10.9.9.9>;+sip.instance="<urn:uuid:1>"',), call_id="new")
    assert [b.contact for b in out.save.bindings] == ["sip:m@10.9.9.9"]


def test_expiry_is_driven_by_the_clock_passed_in(reg):
    register(reg, expires="60")
    assert reg.next_timer() == 1060.0
    assert reg.expire(1059.0) == []
    (gone,) = reg.expire(1060.0)
    assert gone.device_id == "minh-desk" and gone.bindings == ()
    assert reg.bindings(1060.0) == [] and reg.next_timer() is None


def test_bindings_loaded_at_start_are_kept_until_they_expire(reg, tmp_path):
    out = register(reg)
    again = Registrar(reg.policy, out.save.bindings, now=1200.0)
    assert len(again.bindings(1200.0, "minh")) == 1
    assert Registrar(reg.policy, out.save.bindings, now=1300.0).bindings(1300.0) == []


def test_a_reload_drops_bindings_of_removed_devices_and_follows_kind_changes(reg, tmp_path):
    register(reg)
    register(reg, user="lan-desk", password="s3", aor="lan", call_id="l")
    changed = POLICY.replace("{id: minh-desk, kind: ip_phone, password: s1}",
                             "{id: minh-desk, kind: web, password: s1}").replace(
        "      - {id: lan-desk, kind: ip_phone, password: s3}\n", "")
    saves = reg.set_policy(parse_policy(changed, str(tmp_path / "r2.yaml")))
    assert {s.device_id: [b.kind.value for b in s.bindings] for s in saves} == {
        "minh-desk": ["web"], "lan-desk": []}


def test_a_reload_worked_out_beforehand_touches_only_the_devices_that_moved(reg, tmp_path):
    register(reg)
    register(reg, user="lan-desk", password="s3", aor="lan", call_id="l")
    old = reg.policy
    changed = POLICY.replace("{id: minh-desk, kind: ip_phone, password: s1}",
                             "{id: minh-desk, kind: web, password: s1}").replace(
        "      - {id: lan-desk, kind: ip_phone, password: s3}\n", "")
    new = parse_policy(changed, str(tmp_path / "r2.yaml"))
    moves = ownership_moves(old, new)
    assert moves == {"minh-desk": ("minh", DeviceKind.WEB), "lan-desk": None}
    saves = reg.set_policy(new, moves)
    assert {s.device_id: [b.kind.value for b in s.bindings] for s in saves} == {
        "minh-desk": ["web"], "lan-desk": []}
    assert [b.kind for b in reg.bindings(1000.0, "minh")] == [DeviceKind.WEB]
    assert reg.bindings(1000.0, "lan") == []
    assert ownership_moves(new, new) == {}
