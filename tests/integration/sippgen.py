"""Generate small SIPp scenarios for a test, so each test states its own flow."""

from __future__ import annotations

from pathlib import Path

REGISTER = """\
  <send retrans="500">
    <![CDATA[
REGISTER sip:{domain} SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: <sip:{aor}@{domain}>;tag=[call_number]
To: {to}
Call-ID: [call_id]
CSeq: {cseq} REGISTER
Contact: {contact}
{auth}{expires}Max-Forwards: 70
User-Agent: sipp-phone
{extra}Content-Length: 0

    ]]>
  </send>
"""


def register_flow(path: Path, aor: str, after_auth: list[int], *, domain: str = "pbx.test",
                  contact: str = "<sip:[service]@[local_ip]:[local_port]>", expires: str | None = "300",
                  to: str | None = None, extra: str = "", expect_in_200: str | None = None,
                  challenged_first: bool = True) -> Path:
    """REGISTER -> 401, then one authenticated REGISTER per code in ``after_auth``.

    Credentials come from SIPp's -au/-ap; ``[service]`` is SIPp's -s value.
    """
    steps = []
    cseq = 1
    to = to or f"<sip:{aor}@{domain}>"
    head = dict(domain=domain, aor=aor, to=to, contact=contact, extra=extra,
                expires=f"Expires: {expires}\n" if expires is not None else "")
    if challenged_first:
        steps.append(REGISTER.format(cseq=cseq, auth="", **head))
        steps.append('  <recv response="401" auth="true"/>\n')
        cseq += 1
    for code in after_auth:
        steps.append(REGISTER.format(cseq=cseq, auth="[authentication]\n", **head))
        if code == 200 and expect_in_200:
            steps.append(f'  <recv response="200"><action><ereg regexp="{expect_in_200}" '
                         'search_in="msg" check_it="true" assign_to="seen"/></action></recv>\n')
        else:
            auth = ' auth="true"' if code in (401, 407) else ""
            steps.append(f'  <recv response="{code}"{auth}/>\n')
        cseq += 1
    if expect_in_200:
        steps.append('  <Reference variables="seen"/>\n')
    text = ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="register">\n'
            + "".join(steps) + "</scenario>\n")
    path.write_text(text)
    return path


def raw_request(path: Path, message: str, expect: int) -> Path:
    """Send one literal request and expect one status (for malformed input)."""
    path.write_text(
        '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="raw">\n'
        f'  <send retrans="500"><![CDATA[\n{message}\n]]></send>\n'
        f'  <recv response="{expect}"/>\n</scenario>\n')
    return path


INVITE = """\
  <send retrans="500"{start_rtd}><![CDATA[
INVITE sip:{user}@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: "Customer" <sip:{caller}@[local_ip]>;tag=[call_number]c
To: <sip:{to}@pbx.test>
Call-ID: [call_id]
CSeq: {cseq} INVITE
Contact: <sip:{caller}@[local_ip]:[local_port]>
Max-Forwards: {max_forwards}
{headers}Content-Type: application/sdp
Content-Length: [len]

v=0
o=- 1 1 IN IP4 [local_ip]
s=-
c=IN IP4 [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

]]></send>
"""

ACK_FAILURE = """\
  <send><![CDATA[
ACK sip:{user}@[remote_ip]:[remote_port] SIP/2.0
[last_Via:]
From: "Customer" <sip:{caller}@[local_ip]>;tag=[call_number]c
[last_To:]
Call-ID: [call_id]
CSeq: {cseq} ACK
Max-Forwards: 70
Content-Length: 0

]]></send>
"""


def invite_flow(path: Path, user: str, expect: int, *, caller: str = "0909000111", to: str | None = None,
                headers: str = "", cancel_after_ms: int | None = None, bye_after_ms: int = 300,
                proxy_auth: bool = False, bye_from_callee: bool = False, max_forwards: int = 70,
                ringing: int = 1) -> Path:
    """A caller (the upstream ACD, or a device with -au/-ap) places one call and checks the outcome."""
    fmt = dict(user=user, caller=caller, to=to or user, headers=headers, max_forwards=max_forwards)
    steps = []
    cseq = 1
    if proxy_auth:
        steps.append(INVITE.format(cseq=cseq, start_rtd="", **fmt))
        steps.append('  <recv response="407" auth="true"/>\n')
        steps.append(ACK_FAILURE.format(cseq=cseq, **fmt))
        cseq += 1
        fmt["headers"] = "[authentication]\n" + fmt["headers"]
    steps.append(INVITE.format(cseq=cseq, start_rtd=' start_rtd="pdd"', **fmt))
    steps.append('  <recv response="100" optional="true"/>\n')
    if cancel_after_ms is not None:
        steps.append('  <recv response="180" rtd="pdd"/>\n')
        steps.extend('  <recv response="180"/>\n' for _ in range(ringing - 1))   # one per ringing phone
        steps.append(f'  <pause milliseconds="{cancel_after_ms}"/>\n')
        steps.append(f"""  <send><![CDATA[
CANCEL sip:{user}@[remote_ip]:[remote_port] SIP/2.0
[last_Via:]
From: "Customer" <sip:{caller}@[local_ip]>;tag=[call_number]c
To: <sip:{fmt['to']}@pbx.test>
Call-ID: [call_id]
CSeq: {cseq} CANCEL
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200"/>
  <recv response="487"/>
""")
        steps.append(ACK_FAILURE.format(cseq=cseq, **fmt))
    elif expect == 200:
        steps.append('  <recv response="180" optional="true" rtd="pdd"/>\n')
        steps.append('  <recv response="183" optional="true"/>\n')
        steps.append('  <recv response="200" rrs="true"/>\n')
        steps.append(f"""  <send><![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
[routes]
From: "Customer" <sip:{caller}@[local_ip]>;tag=[call_number]c
[last_To:]
Call-ID: [call_id]
CSeq: {cseq} ACK
Max-Forwards: 70
Content-Length: 0

]]></send>
""")
        if bye_from_callee:
            steps.append("""  <recv request="BYE"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
""")
        else:
            steps.append(f'  <pause milliseconds="{bye_after_ms}"/>\n')
            steps.append(f"""  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
[routes]
From: "Customer" <sip:{caller}@[local_ip]>;tag=[call_number]c
[last_To:]
Call-ID: [call_id]
CSeq: {cseq + 1} BYE
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200"/>
""")
    else:
        steps.append('  <recv response="180" optional="true"/>\n')
        steps.append(f'  <recv response="{expect}" rtd="pdd"/>\n')
        steps.append(ACK_FAILURE.format(cseq=cseq, **fmt))
    path.write_text('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="caller">\n'
                    + "".join(steps) + "</scenario>\n")
    return path


def fork_call_flow(path: Path, user: str = "[field0]", bye_after_ms: int = 0) -> Path:
    """The forked call of ``benchmarks/call_rate.py fork``: two phones ring (either may send
    180 first, both may), one answers, the router cancels the other; ACK, then BYE."""
    invite_flow(path, user, 200, bye_after_ms=bye_after_ms, ringing=1)
    text = path.read_text().replace(
        '<recv response="180" optional="true" rtd="pdd"/>',
        '<recv response="180" optional="true" rtd="pdd"/>\n  <recv response="180" optional="true"/>')
    path.write_text(text.replace('  <pause milliseconds="0"/>\n', ""))
    return path
