"""Parse and build SIP messages (RFC 3261 §7, §20, §25); pure, no I/O.

Theory of operation.  ``parse`` turns bytes into an immutable ``SipMessage``:
the start line, the headers in order as ``(canonical lower-case name, value)``
pairs, and the body.  It accepts what real phones send -- compact header
names, folded header lines, bare LF line ends -- and raises
``MalformedMessage`` for what RFC 3261 forbids, including a body shorter than
its Content-Length (a datagram cut by PJSIP at 4,000 bytes).  The mandatory
headers are checked once there -- the top Via, CSeq, Max-Forwards and
Content-Length as numbers of plain ASCII digits, From and To as name-addrs --
so code after ``parse`` may read them without guarding.  Other header values
are parsed only when asked (``name_addr``, ``auth_params`` ...), so a
retransmission or an OPTIONS ping costs little.  Responses are built from the
request they answer, copying Via, From, To, Call-ID and CSeq as §8.2.6 says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from router.errors import MalformedMessage

COMPACT = {"i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
           "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to",
           "v": "via", "o": "event", "r": "refer-to", "b": "referred-by", "u": "allow-events",
           "x": "session-expires", "y": "identity"}
# Canonical spelling used when we write a header we parsed.
PRETTY = {"call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate",
          "max-forwards": "Max-Forwards", "content-length": "Content-Length",
          "record-route": "Record-Route", "user-agent": "User-Agent", "min-expires": "Min-Expires",
          "proxy-authenticate": "Proxy-Authenticate", "proxy-authorization": "Proxy-Authorization",
          "p-asserted-identity": "P-Asserted-Identity", "content-type": "Content-Type"}
# Headers whose value may be a comma-separated list of several entries (§7.3.1).
LIST_HEADERS = frozenset({"via", "contact", "route", "record-route", "path", "allow", "supported",
                          "require", "proxy-require", "unsupported"})
REQUIRED = ("via", "from", "to", "call-id", "cseq")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_REQUEST_LINE = re.compile(r"^([A-Za-z0-9\-.!%*_+`'~]+) (\S+) SIP/2\.0$")
_STATUS_LINE = re.compile(r"^SIP/2\.0 ([0-9]{3}) ?(.*)$")
MAX_URI_LENGTH = 512


def is_number(text: str, max_digits: int = 10) -> bool:
    """ASCII digits only, at most ``max_digits`` of them.  (``str.isdigit`` also
    accepts "²" and "١", which ``int`` refuses or reads, and any length.)"""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


PRETTY_SEEN: dict[str, str] = dict(PRETTY)   # PRETTY and every name written so far (``render``)
_SEEN_LIMIT = 512           # names remembered; beyond that (a flood of made-up names) computed each time


def pretty_name(name: str) -> str:
    found = PRETTY_SEEN.get(name)
    if found is not None:
        return found
    pretty = "-".join(part.capitalize() for part in name.split("-"))
    if len(PRETTY_SEEN) < _SEEN_LIMIT:
        PRETTY_SEEN[name] = pretty
    return pretty


class SipMessage(NamedTuple):
    """One parsed message, immutable (a named tuple: made for every datagram, and a frozen
    dataclass's ``__init__`` cost four times as much)."""

    method: str                   # request method, or the CSeq method of a response
    uri: str                      # Request-URI ("" for responses)
    status: int                   # 0 for requests
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    via0: Via | None = None       # the top Via, parsed once by ``parse``
    # Filled by ``parse``: each header's first value, and From and To parsed (checked there).
    first: dict[str, str] | None = None
    from_to: tuple[NameAddr, NameAddr] | None = None

    @property
    def is_request(self) -> bool:
        return self.status == 0

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case canonical name)."""
        if self.first is not None:
            return self.first.get(name)
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def all(self, name: str) -> list[str]:
        """Every entry of ``name``, list headers split on top-level commas."""
        out: list[str] = []
        for key, value in self.headers:
            if key == name:
                out.extend(split_list(value) if name in LIST_HEADERS else [value])
        return out

    @property
    def call_id(self) -> str:
        return self.header("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self.header("cseq") or "")

    @property
    def top_via(self) -> Via:
        if self.via0 is not None:
            return self.via0
        return parse_via(self.all("via")[0])

    def tag(self, name: str) -> str:
        """The tag of From or To (``name``), "" when there is none; ``parse`` has
        checked both headers, so this does not fail on a parsed message."""
        if self.from_to is not None and name in ("from", "to"):
            return self.from_to[name == "to"].tag or ""
        return parse_name_addr(self.header(name) or "").tag or ""


# Not frozen: made for every header parsed, and a frozen dataclass's __init__ costs three times
# as much.  Nothing changes one after ``parse`` (its dict of params never was frozen either).
@dataclass(slots=True)
class Via:
    transport: str
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str:
        return self.params.get("branch") or ""


@dataclass(slots=True)
class Uri:
    scheme: str
    user: str
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(slots=True)
class NameAddr:
    display: str
    uri: str
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")


# --------------------------------------------------------------------------- parsing

def parse(data: bytes) -> SipMessage:
    """Parse one SIP message; raise ``MalformedMessage`` with a human reason."""
    sep = data.find(b"\r\n\r\n")
    if sep >= 0:
        head, body = data[:sep], data[sep + 4:]
    else:
        sep = data.find(b"\n\n")
        if sep < 0:
            raise MalformedMessage("no blank line ends the headers")
        head, body = data[:sep], data[sep + 2:]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("headers are not UTF-8") from None
    start, _, rest = text.partition("\n")
    start = start.strip()
    names = _NAMES
    # The usual message (one "Name: value" per line, nothing folded) in one pass of a
    # compiled pattern; anything else line by line, where each fault gets its own message.
    found = _HEADER_LINE.findall(rest)
    if len(found) == rest.count("\n") + 1:
        headers = [(names.get(raw) or _header_name(raw), value.strip()) for raw, value in found]
    else:
        headers = _header_lines(rest)
    match = _REQUEST_LINE.match(start)
    if match:
        method, uri, status, reason = match.group(1), match.group(2), 0, ""
        if len(uri) > MAX_URI_LENGTH:
            raise MalformedMessage("Request-URI too long")
    else:
        smatch = _STATUS_LINE.match(start)
        if not smatch:
            raise MalformedMessage(f"not a SIP/2.0 request or status line: {start[:60]!r}")
        method, uri, status, reason = "", "", int(smatch.group(1)), smatch.group(2)
        if status < 100:
            raise MalformedMessage(f"status code {status} is not valid")
    first = dict(reversed(headers))     # the last pair of a name wins: its first value
    cseq_method, via0, from_to = _check(method, status, headers, first, body)
    return SipMessage(method or cseq_method, uri, status, reason, tuple(headers), body, via0,
                      first, from_to)


_NAMES: dict[str, str] = {}          # header name as written -> canonical lower-case name
# A line that starts with a name (not with white space: that is a folded line) and a colon.
_HEADER_LINE = re.compile(r"^([^:\s][^:\r\n]*):([^\n]*)", re.MULTILINE)


def _header_lines(rest: str) -> list[tuple[str, str]]:
    """The header lines one by one: folded lines joined (§7.3.1), blank lines skipped."""
    headers: list[tuple[str, str]] = []
    names = _NAMES
    for line in rest.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        if line[0] in " \t":        # folded continuation of the previous header (§7.3.1)
            if not headers:
                raise MalformedMessage("a folded line comes before any header")
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        colon = line.find(":")
        if colon <= 0:
            raise MalformedMessage(f"header line without a name and colon: {line[:40]!r}")
        raw = line[:colon]
        name = names.get(raw) or _header_name(raw)
        headers.append((name, line[colon + 1:].strip()))
    return headers


def _header_name(raw: str) -> str:
    name = raw.strip().lower()
    if not _TOKEN_RE.match(name):
        raise MalformedMessage(f"invalid header name {name[:40]!r}")
    name = COMPACT.get(name, name)
    if len(_NAMES) < _SEEN_LIMIT:
        _NAMES[raw] = name
    return name


def _check(method: str, status: int, headers: list[tuple[str, str]], first: dict[str, str],
           body: bytes) -> tuple[str, Via, tuple[NameAddr, NameAddr]]:
    """The mandatory headers, checked once: the CSeq method, the top Via, From and To."""
    missing = [pretty_name(h) for h in REQUIRED if h not in first]
    if missing:
        raise MalformedMessage(f"missing mandatory header(s): {', '.join(missing)}")
    _, cseq_method = parse_cseq(first["cseq"])
    if status == 0 and cseq_method != method:
        raise MalformedMessage(f"CSeq method {cseq_method} does not match the request method {method}")
    length = first.get("content-length")
    if length is not None:
        if not is_number(length):
            raise MalformedMessage(f"Content-Length {length[:20]!r} is not a number")
        if int(length) > len(body):
            raise MalformedMessage(
                f"body is {len(body)} bytes but Content-Length says {length}: truncated")
    if "max-forwards" in first:
        for name, mf in headers:
            if name == "max-forwards" and not (is_number(mf, 3) and int(mf) <= 255):
                raise MalformedMessage(f"Max-Forwards {mf[:20]!r} is not a number from 0 to 255")
    from_to = (parse_name_addr(first["from"], "From"), parse_name_addr(first["to"], "To"))
    try:
        return cseq_method, parse_via(split_list(first["via"])[0]), from_to
    except (IndexError, ValueError) as exc:
        raise MalformedMessage(f"top Via is not valid: {exc}") from None


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split()
    if len(parts) != 2 or not is_number(parts[0]):
        raise MalformedMessage(f"CSeq {value[:40]!r} is not 'number METHOD'")
    number = int(parts[0])
    if number >= 2**31:
        raise MalformedMessage("CSeq number must be below 2**31")
    return number, parts[1]


_LIST_ITEM = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|<[^>]*>?|[^,"<])+')
# The quoted string as "normal* (escaped normal*)*": the same language as ("(?:[^"\\]|\\.)*"),
# without an alternation per character (less than half the time on a 200-character header).
_AUTH_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("[^"\\]*(?:\\.[^"\\]*)*"|[^\s,]*)')


def split_list(value: str) -> list[str]:
    """Split on commas that are outside quotes and angle brackets."""
    if "," not in value:
        return [value.strip()]
    if '"' not in value and "<" not in value:      # no quoted or bracketed commas: a plain split
        return [item for item in (part.strip() for part in value.split(",")) if item]
    return [item.strip() for item in _LIST_ITEM.findall(value) if item.strip()]


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if not text:
        return params
    for part in text.split(";"):
        if "=" in part:
            key, _, val = part.partition("=")
            params[key.strip().lower()] = val.strip()
        else:
            part = part.strip()
            if part:
                params[part.lower()] = None
    return params


def parse_via(value: str) -> Via:
    proto, _, rest = value.strip().partition(" ")
    parts = proto.split("/")
    if len(parts) != 3 or parts[0].upper() != "SIP" or parts[1] != "2.0" or not rest.strip():
        raise ValueError(f"{value[:60]!r} is not 'SIP/2.0/TRANSPORT host'")
    sent_by, _, params = rest.strip().partition(";")
    host, port = _host_port(sent_by.strip())
    return Via(parts[2].upper(), host, port, parse_params(params))


def _host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 reference {text!r}")
        host, rest = text[: end + 1], text[end + 1:]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("empty host")
    if port_text:
        if not is_number(port_text, 5):
            raise ValueError(f"port {port_text[:20]!r} is not valid")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"port {port_text[:20]!r} is not valid")
        return host.lower(), port
    return host.lower(), None


def parse_uri(uri: str) -> Uri:
    """A sip:, sips: or tel: URI.  tel: numbers come back as ``user``."""
    scheme, colon, rest = uri.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips", "tel"):
        raise MalformedMessage(f"{uri[:60]!r} is not a sip:, sips: or tel: URI")
    if scheme == "tel":
        number, _, params = rest.partition(";")
        return Uri("tel", number.replace("-", "").replace(".", ""), "", None, parse_params(params))
    rest, _, _headers = rest.partition("?")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        hostpart = rest
    user = userinfo.partition(":")[0]
    hostport, _, params = hostpart.partition(";")
    try:
        host, port = _host_port(hostport)
    except ValueError as exc:
        raise MalformedMessage(f"URI {uri[:60]!r}: {exc}") from None
    return Uri(scheme, _unescape(user), host, port, parse_params(params))


def _unescape(text: str) -> str:
    if "%" not in text:
        return text
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def parse_name_addr(value: str, what: str = "") -> NameAddr:
    """From, To, Contact, Route entries: ``"Name" <uri>;params`` or ``uri;params``.

    ``what`` names the header in the error ("To: empty URI in ''").
    """
    value = value.strip()
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        if gt < 0:
            where = f"{what}: " if what else ""
            raise MalformedMessage(f"{where}unterminated <uri> in {value[:60]!r}")
        display = value[:lt].strip().strip('"') if lt else ""
        uri = value[lt + 1:gt].strip()
        rest = value[gt + 1:]
    else:
        display = ""
        uri, _, rest = value.partition(";")   # addr-spec: params after ; belong to the header
        uri = uri.strip()
    if not uri:
        where = f"{what}: " if what else ""
        raise MalformedMessage(f"{where}empty URI in {value[:60]!r}")
    return NameAddr(display, uri, parse_params(rest))


def auth_params(value: str) -> tuple[str, dict[str, str]]:
    """``Digest k=v, k="v"`` -> ("digest", {k: v}); quoted values unquoted."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    for key, val in _AUTH_PARAM.findall(rest):
        if len(val) >= 2 and val[0] == '"':
            val = val[1:-1]
            if "\\" in val:
                val = re.sub(r"\\(.)", r"\1", val)
        params[key.lower()] = val
    return scheme.lower(), params


# --------------------------------------------------------------------------- building

def with_tag(to_value: str, tag: str) -> str:
    if ";tag=" in to_value.replace(" ", "").lower():
        return to_value
    return f"{to_value};tag={tag}"


_EMPTY_RPORT = re.compile(r";\s*rport\s*=?\s*(?=;|$)")


def stamp_received(via_value: str, host: str, port: int, via: Via | None = None) -> str:
    """A received request's top Via stamped with received/rport (§18.2.1, RFC 3581);
    ``via``: the same Via already parsed."""
    if via is None:
        via = parse_via(via_value)
    wants_rport = "rport" in via.params and not via.params["rport"]
    if wants_rport:
        at = via_value.find(";rport")
        end = at + 6
        if at >= 0 and via_value.count("rport") == 1 and (end == len(via_value) or via_value[end] == ";"):
            via_value = f"{via_value[:at]};rport={port}{via_value[end:]}"     # the usual ";rport"
        else:
            via_value = _EMPTY_RPORT.sub(f";rport={port}", via_value, count=1)
    if (via.host != host or wants_rport) and "received" not in via.params:
        via_value += f";received={host}"
    return via_value


def response_via(request: SipMessage, source_host: str, source_port: int) -> list[str]:
    """The request's Vias, the top one stamped with received/rport."""
    vias = request.all("via")
    return [stamp_received(vias[0], source_host, source_port, request.via0), *vias[1:]]


def response_destination(request: SipMessage, source_host: str, source_port: int) -> tuple[str, int]:
    """Where a response to ``request`` goes over UDP (§18.2.2 with RFC 3581 rport)."""
    via = request.top_via
    if "rport" in via.params:
        return source_host, source_port
    return source_host, via.port or 5060


def build_response(request: SipMessage, status: int, reason: str,
                   source: tuple[str, int], to_tag: str | None = None,
                   headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
                   body: bytes = b"", server: str = "sip-router") -> bytes:
    """Bytes of a response to ``request`` (§8.2.6).  ``headers`` are (Name, value)."""
    out = [f"SIP/2.0 {status} {reason}"]
    out.extend(f"Via: {v}" for v in response_via(request, *source))
    out.append(f"From: {request.header('from')}")
    to = request.header("to") or ""
    out.append(f"To: {with_tag(to, to_tag) if to_tag and status > 100 else to}")
    out.append(f"Call-ID: {request.call_id}")
    out.append(f"CSeq: {request.header('cseq')}")
    out.extend(f"{name}: {value}" for name, value in headers)
    out.append(f"Server: {server}")
    out.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(out) + "\r\n\r\n").encode() + body
