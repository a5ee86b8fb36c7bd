"""The SIP message layer: what real phones send is understood, what RFC 3261 forbids is refused."""

from __future__ import annotations

import pytest

from router.errors import MalformedMessage
from router.sip.message import (
    auth_params,
    build_response,
    parse,
    parse_name_addr,
    parse_uri,
    parse_via,
    response_destination,
    split_list,
)

REQUEST = (
    "REGISTER sip:pbx.test SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK77;rport\r\n"
    "Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK99\r\n"
    "From: \"Minh\" <sip:1002@pbx.test>;tag=abc\r\n"
    "To: <sip:1002@pbx.test>\r\n"
    "Call-ID: c1@10.0.0.5\r\n"
    "CSeq: 7 REGISTER\r\n"
    "Contact: <sip:minh@10.0.0.5:5062>;q=0.7;expires=120, <sip:minh@10.0.0.6>\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n")


def test_a_request_is_parsed_into_start_line_and_ordered_headers():
    msg = parse(REQUEST.encode())
    assert (msg.method, msg.uri, msg.is_request) == ("REGISTER", "sip:pbx.test", True)
    assert msg.call_id == "c1@10.0.0.5" and msg.cseq == (7, "REGISTER")
    assert msg.all("contact") == ["<sip:minh@10.0.0.5:5062>;q=0.7;expires=120", "<sip:minh@10.0.0.6>"]
    assert len(msg.all("via")) == 2
    assert msg.top_via.branch == "z9hG4bK77" and msg.top_via.port == 5062


def test_compact_header_names_are_understood():
    text = REQUEST.replace("Via:", "v:").replace("From:", "f:").replace("To:", "t:") \
        .replace("Call-ID:", "i:").replace("Contact:", "m:").replace("Content-Length:", "l:")
    msg = parse(text.encode())
    assert msg.call_id == "c1@10.0.0.5" and len(msg.all("contact")) == 2


def test_folded_header_lines_are_joined():
    msg = parse(REQUEST.replace("To: <sip:1002@pbx.test>", "To:\r\n   <sip:1002@pbx.test>").encode())
    assert msg.header("to") == "<sip:1002@pbx.test>"


def test_bare_lf_line_ends_are_accepted():
    msg = parse(REQUEST.replace("\r\n", "\n").encode())
    assert msg.cseq == (7, "REGISTER")


def test_a_response_takes_its_method_from_cseq():
    msg = parse(b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\n"
                b"To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
    assert (msg.status, msg.reason, msg.method, msg.is_request) == (180, "Ringing", "INVITE", False)


@pytest.mark.parametrize("mutate, reason", [
    (lambda t: t.replace("Call-ID: c1@10.0.0.5\r\n", ""), r"missing mandatory header\(s\): Call-ID"),
    (lambda t: t.replace("CSeq: 7 REGISTER", "CSeq: 7 INVITE"), "does not match the request method"),
    (lambda t: t.replace("CSeq: 7 REGISTER", "CSeq: seven REGISTER"), "is not 'number METHOD'"),
    (lambda t: t.replace("Content-Length: 0", "Content-Length: 40"), "truncated"),
    (lambda t: t.replace("Max-Forwards: 70", "Max-Forwards: many"), "Max-Forwards"),
    (lambda t: t.replace("SIP/2.0/UDP 10.0.0.5:5062", "SIP/3.0/UDP 10.0.0.5"), "top Via is not valid"),
    (lambda t: t.replace("REGISTER sip:pbx.test SIP/2.0", "REGISTER sip:pbx.test HTTP/1.1"), "not a SIP/2.0"),
    (lambda t: t.replace("\r\n\r\n", "\r\n"), "no blank line"),
    (lambda t: t.replace("Max-Forwards: 70", "Bad Header: 1"), "invalid header name"),
])
def test_malformed_messages_are_refused_with_a_reason(mutate, reason):
    with pytest.raises(MalformedMessage, match=reason):
        parse(mutate(REQUEST).encode())


def test_a_body_up_to_content_length_is_kept():
    text = REQUEST.replace("Content-Length: 0", "Content-Length: 5") + "v=0\r\n"
    assert parse(text.encode()).body == b"v=0\r\n"


def test_split_list_respects_quotes_and_angle_brackets():
    assert split_list('"Doe, J" <sip:a@b>;q=1, <sip:c,d@e>') == ['"Doe, J" <sip:a@b>;q=1', "<sip:c,d@e>"]


def test_name_addr_with_and_without_brackets():
    a = parse_name_addr('"Minh" <sip:1002@pbx.test;transport=udp>;tag=x')
    assert (a.display, a.uri, a.tag) == ("Minh", "sip:1002@pbx.test;transport=udp", "x")
    b = parse_name_addr("sip:1002@pbx.test;tag=y")
    assert (b.uri, b.tag) == ("sip:1002@pbx.test", "y")


def test_uris_sip_and_tel():
    u = parse_uri("sip:1002@[::1]:5070;transport=tcp")
    assert (u.user, u.host, u.port, u.params["transport"]) == ("1002", "[::1]", 5070, "tcp")
    assert parse_uri("tel:+84-912-345-678;phone-context=x").user == "+84912345678"
    with pytest.raises(MalformedMessage):
        parse_uri("http://example.com")


def test_via_parameters():
    via = parse_via("SIP/2.0/TCP host.example:5080;branch=z9hG4bKa;rport;received=1.2.3.4")
    assert (via.transport, via.host, via.port, via.params["rport"]) == ("TCP", "host.example", 5080, None)


def test_auth_params_unquote_values():
    scheme, params = auth_params('Digest username="a\\"b", realm="r", nc=00000001, qop=auth')
    assert scheme == "digest"
    assert params == {"username": 'a"b', "realm": "r", "nc": "00000001", "qop": "auth"}


def test_a_response_copies_the_dialog_headers_and_stamps_received_and_rport():
    msg = parse(REQUEST.encode())
    data = build_response(msg, 200, "OK", ("192.0.2.7", 40000), to_tag="t1",
                          headers=[("Contact", "<sip:minh@10.0.0.5:5062>;expires=120")])
    reply = parse(data)
    top = reply.all("via")[0]
    assert "rport=40000" in top and "received=192.0.2.7" in top
    assert reply.all("via")[1] == "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK99"
    assert reply.header("to") == "<sip:1002@pbx.test>;tag=t1"
    assert reply.header("from") == msg.header("from") and reply.cseq == (7, "REGISTER")


def test_responses_go_to_the_source_with_rport_and_to_the_via_port_without():
    msg = parse(REQUEST.encode())
    assert response_destination(msg, "192.0.2.7", 40000) == ("192.0.2.7", 40000)
    no_rport = parse(REQUEST.replace(";rport", "").encode())
    assert response_destination(no_rport, "192.0.2.7", 40000) == ("192.0.2.7", 5062)


# ------------------------------------------------------------------ found by fuzzing (tests/unit/test_fuzz.py)

@pytest.mark.parametrize("header, value", [
    ("Content-Length", "\u00b2"),          # str.isdigit() is True, int() raises
    ("Content-Length", "9" * 5000),        # int() refuses more than 4,300 digits
    ("Max-Forwards", "\u00b2"),
    ("Max-Forwards", "9" * 5000),
    ("Max-Forwards", "\u0661"),            # an Arabic-Indic one: int() reads it, SIP does not
    ("CSeq", "\u00b2 REGISTER"),
    ("CSeq", "\u0661 REGISTER"),
])
def test_numbers_in_other_scripts_or_too_long_are_malformed_not_an_error(header, value):
    text = REQUEST.replace("Max-Forwards: 70\r\n", "").replace("Content-Length: 0\r\n", "") \
        .replace("CSeq: 7 REGISTER\r\n", "")
    text = text.replace("\r\n\r\n", f"\r\n{header}: {value}\r\n" + ("" if header == "CSeq" else
                                                                    "CSeq: 7 REGISTER\r\n") + "\r\n")
    with pytest.raises(MalformedMessage):
        parse(text.encode())


def test_a_second_max_forwards_that_is_not_a_number_is_malformed():
    with pytest.raises(MalformedMessage, match="Max-Forwards 'abc'"):
        parse(REQUEST.replace("Max-Forwards: 70\r\n", "Max-Forwards: 70\r\nMax-Forwards: abc\r\n").encode())


@pytest.mark.parametrize("via", ["SIP/2.0/UDP host:\u00b2", "SIP/2.0/UDP host:" + "5" * 5000])
def test_a_via_port_in_other_digits_or_too_long_is_malformed(via):
    with pytest.raises(MalformedMessage, match="top Via"):
        parse(REQUEST.replace("Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK77;rport", f"Via: {via}").encode())


def test_a_status_code_in_other_digits_is_not_a_status_line():
    response = build_response(parse(REQUEST.encode()), 200, "OK", ("192.0.2.7", 40000))
    with pytest.raises(MalformedMessage, match="not a SIP/2.0 request or status line"):
        parse(response.replace(b"SIP/2.0 200", "SIP/2.0 \u0662\u0660\u0660".encode()))


@pytest.mark.parametrize("header, value, reason", [
    ("To", "", "To: empty URI"),
    ("To", "<>", "To: empty URI"),
    ("To", "<sip:1002@pbx.test", "To: unterminated <uri>"),
    ("From", "", "From: empty URI"),
    ("From", '"Minh" <sip:1002@pbx.test;tag=abc', "From: unterminated <uri>"),
])
def test_a_from_or_to_that_is_not_a_name_addr_is_malformed(header, value, reason):
    """The core reads the To tag and the From tag of every request: parse checks them once."""
    line = next(line for line in REQUEST.split("\r\n") if line.startswith(f"{header}:"))
    with pytest.raises(MalformedMessage, match=reason):
        parse(REQUEST.replace(line, f"{header}: {value}").encode())
