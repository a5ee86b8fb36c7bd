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
