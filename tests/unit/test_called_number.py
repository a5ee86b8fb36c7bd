"""The called number finds its queue however the upstream PBX writes it.

The customer's PBX sends the dialled hotline or DID in To as ``+84...``,
``tel:+84...``, ``sip:+84...@host;user=phone``, ``028...`` (national, with the
trunk prefix) or with visual separators.  Each must find the queue the
canonical ``842873001234`` finds, and so the caller ID of the PSTN leg.  A
number nobody can read matches no queue, and nothing raises.
"""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.cli import main
from router.errors import MalformedMessage
from router.policy.decide import CallRequest, PstnLeg, decide
from router.policy.numbers import dialled
from router.sip.callrules import called_number
from router.sip.commands import Send, Source
from router.sip.core import SipCore
from router.sip.forward import Local
from router.sip.message import SipMessage, parse
from router.store.sqlite import connect

from .conftest import BASE
from .test_decide import with_method

SUPPORT_HOTLINE = "842873001234"     # queue support; its DID is 842873001235
SALES_HOTLINE = "842873009999"       # minh's default queue
SUPPORT_FORMS = [
    "842873001234",
    "+842873001234",
    "tel:+842873001234",
    "sip:+842873001234@pbx.example;user=phone",
    "02873001234",
    "tel:+84-28-7300-1234",
    "+84 28 7300 1234",
    "(028) 7300-1234",
    "00842873001234",
    "tel:02873001234;phone-context=+84",
    "sips:842873001234@pbx.example",
]
NOT_A_QUEUE = ["0999", "84911111111", "+12025550123", "minh", "", "tel:", "sip:pbx.test", "mailto:x@y",
               "+84" + "9" * 80, "٠٢٨٧٣٠٠١٢٣٤", "0²873001234"]
FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------- the policy core

@pytest.mark.parametrize("written", SUPPORT_FORMS)
def test_a_call_to_the_support_hotline_in_any_form_finds_support_and_the_pstn_leg_shows_its_hotline(
        policy, written):
    policy = with_method(policy, "minh", "agent_phone")
    decision = decide(policy, CallRequest(user="minh", called_number=written), [], 1000.0)
    assert isinstance(decision, PstnLeg)
    assert decision.queue_id == "support" and decision.caller_id == SUPPORT_HOTLINE
    assert f"queue 'support' from the called number {written}" in decision.notes[0]


@pytest.mark.parametrize("written", ["+842873001235", "tel:+84-28-7300-1235", "02873001235"])
def test_a_call_to_a_support_did_in_another_form_finds_support(policy, written):
    assert policy.queue_for_number(written).id == "support"


@pytest.mark.parametrize("written", NOT_A_QUEUE)
def test_a_number_that_matches_no_queue_falls_to_the_default_queue_and_the_note_says_so(policy, written):
    policy = with_method(policy, "minh", "agent_phone")
    decision = decide(policy, CallRequest(user="minh", called_number=written or None), [], 1000.0)
    assert decision.queue_id == "sales" and decision.caller_id == SALES_HOTLINE
    if written:
        assert decision.notes[0].startswith(f"the called number {written}")
        assert "matched no queue's hotline or DID; using the user's default queue 'sales'" in decision.notes[0]


def test_without_a_default_queue_the_note_says_there_is_no_queue(policy):
    policy = with_method(policy, "minh", "agent_phone", default_queue=None)
    decision = decide(policy, CallRequest(user="minh", called_number="0999"), [], 1000.0)
    assert decision.status == 480 and "no hotline to call from" in decision.reason
    assert "matched no queue's hotline or DID" in decision.notes[0] and "no default queue" in decision.notes[0]


def test_the_national_form_is_read_with_the_policys_country(make_policy):
    """``country:`` decides what 028... means; the router's own form does not depend on it."""
    assert make_policy("country: VN\n").queue_for_number("02873001234").id == "support"
    assert dialled("02873001234", "VN") == SUPPORT_HOTLINE
    assert dialled("02873001234", "FR") != SUPPORT_HOTLINE
    assert dialled("+842873001234", "FR") == SUPPORT_HOTLINE
    assert dialled("02873001234", "not a country") is None


@pytest.mark.parametrize("written", [w for w in NOT_A_QUEUE if w not in ("84911111111", "+12025550123")])
def test_dialled_gives_none_for_what_is_not_a_valid_number(written):
    assert dialled(written) is None


@FUZZ
@given(st.text(max_size=80), st.sampled_from(["VN", "FR", "IT", "US", "", "ZZ", "vn", "XX"]))
def test_dialled_never_raises_and_its_answer_reads_as_itself(raw, region):
    number = dialled(raw, region)
    assert number is None or (number.isascii() and number.isdigit() and dialled(number, region) == number)


# ------------------------------------------------------------------- the SIP side

def to_header(to: str) -> SipMessage:
    return SipMessage("INVITE", "sip:1002@pbx.test", 0, "", (("to", to),))


@pytest.mark.parametrize("to, expected", [
    ("<sip:842873001234@pbx.test>", "842873001234"),
    ("<sip:+842873001234@pbx.test;user=phone>", "+842873001234"),
    ("<tel:+84-28-7300-1234>", "tel:+84-28-7300-1234"),
    ("tel:+842873001234;tag=x", "tel:+842873001234"),
    ("<sip:02873001234@pbx.test>", "02873001234"),
    ("<sip:2873001234;phone-context=+84@pbx.test;user=phone>", "2873001234;phone-context=+84"),
    ("<sip:minh@pbx.test>", None),
    ("<mailto:x@y>", None),
    ("<urn:service:sos>", None),
    ("<sip:pbx.test>", None),
    ("<sip:[::1]:5060>", None),
    ("<sip:broken", None),
    ("", None),
    ("<sip:" + "1" * 5000 + "@pbx.test>", None),
])
def test_called_number_reads_the_to_user_as_written_and_never_raises(to, expected):
    assert called_number(to_header(to)) == expected


def test_a_broken_to_uri_raises_a_value_error_that_called_number_catches():
    from router.sip.message import parse_uri
    assert issubclass(MalformedMessage, ValueError)
    with pytest.raises(ValueError):
        parse_uri("mailto:x@y")
    assert called_number(to_header("<mailto:x@y>")) is None


@FUZZ
@given(st.text(max_size=120))
def test_called_number_never_raises_on_any_to_header(to):
    number = called_number(to_header(to))
    assert number is None or len(number) <= 70


ACD = Source("10.0.0.1", 5060)
TRUNK_POLICY = """
domain: pbx.test
trunk: {address: 10.9.9.9, port: 5080}
trusted_peers: [{name: acd, address: 10.0.0.1}]
queues:
  - {id: support, hotline: "842873001234", dids: ["842873001235"]}
  - {id: sales, hotline: "842873009999"}
users:
  - {id: minh, extension: "1002", receive_method: agent_phone, agent_phone: "84987654321",
     default_queue: sales, devices: [{id: desk, kind: ip_phone, password: a}]}
"""


def pbx_invite(to_uri: str) -> bytes:
    return (f"INVITE sip:1002@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKcalled\r\n"
            f"From: <sip:0909123456@10.0.0.1>;tag=c1\r\nTo: <{to_uri}>\r\nCall-ID: called-1\r\n"
            "CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


@pytest.fixture
def core(tmp_path):
    from router.config import parse_policy
    return SipCore(parse_policy(TRUNK_POLICY, str(tmp_path / "r.yaml")), [], 1000.0, secret=b"s" * 32,
                   local=Local("10.0.0.2", 5060))


@pytest.mark.parametrize("to_uri", [
    "sip:842873001234@10.0.0.2",
    "sip:+842873001234@10.0.0.2;user=phone",
    "tel:+842873001234",
    "tel:+84-28-7300-1234",
    "sip:02873001234@10.0.0.2",
    "sip:+84-28-7300-1234@10.0.0.2;user=phone",
])
def test_a_pbx_call_to_the_support_hotline_rings_the_agent_phone_from_the_support_hotline(core, to_uri):
    out = core.on_request(pbx_invite(to_uri), ACD, 1000.0)
    (leg,) = [parse(c.data) for c in out if isinstance(c, Send) and c.host == "10.9.9.9"]
    assert leg.uri == "sip:84987654321@10.9.9.9:5080"
    assert leg.header("p-asserted-identity") == f"<sip:{SUPPORT_HOTLINE}@10.9.9.9>"


@pytest.mark.parametrize("to_uri", ["sip:0999@10.0.0.2", "mailto:x@y", "sip:minh@10.0.0.2", "urn:service:sos"])
def test_a_pbx_call_to_an_unknown_or_odd_number_uses_the_default_queue_hotline(core, to_uri):
    out = core.on_request(pbx_invite(to_uri), ACD, 1000.0)
    (leg,) = [parse(c.data) for c in out if isinstance(c, Send) and c.host == "10.9.9.9"]
    assert leg.header("p-asserted-identity") == f"<sip:{SALES_HOTLINE}@10.9.9.9>"


# ------------------------------------------------------------------- explain

@pytest.fixture
def config(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent(BASE).format(state_dir=tmp_path))
    connect(str(tmp_path / "router.db")).close()        # the CLI opens the router's database, never makes one
    return str(path)


def explain(capsys, config, *argv):
    code = main(["-c", config, *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("written", ["+842873001234", "tel:+84-28-7300-1234", "02873001234",
                                     "sip:+842873001234@pbx.example;user=phone"])
def test_explain_accepts_the_forms_a_pbx_writes(capsys, config, written):
    out = explain(capsys, config, "explain", "minh", "--called", written)
    assert f"queue 'support' from the called number {written} (842873001234)" in out


def test_explain_says_clearly_when_the_called_number_matched_no_queue(capsys, config):
    out = explain(capsys, config, "explain", "minh", "--called", "0999")
    assert ("the called number 0999 is not a VN phone number, so it matched no queue's hotline or DID; "
            "using the user's default queue 'sales'") in out
    out = explain(capsys, config, "explain", "minh", "--called", "+84911111111")
    assert ("the called number +84911111111 (84911111111) matched no queue's hotline or DID; "
            "using the user's default queue 'sales'") in out


def test_explain_json_shows_how_the_called_number_was_read(capsys, config):
    import json
    data = json.loads(explain(capsys, config, "--json", "explain", "minh", "--called", "tel:+84-28-7300-1235"))
    assert data["called_number"] == {"as_given": "tel:+84-28-7300-1235", "canonical": "842873001235",
                                     "queue": "support"}
    data = json.loads(explain(capsys, config, "--json", "explain", "minh", "--called", "0999"))
    assert data["called_number"] == {"as_given": "0999", "canonical": None, "queue": None}
