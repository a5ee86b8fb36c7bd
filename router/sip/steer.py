"""Which worker owns a datagram that reached a shared port; pure.

With ``workers: N`` every worker process listens on each shared UDP port (the
kernel hands a datagram to any of them) and on a port of its own (port+1+k),
which it names in its Via and Record-Route.  A datagram that reached the shared
port is read just far enough to find its owner, and handed to that worker when
it is another one:

- a response: the worker whose mark ends the top Via's branch (``.w<k>``,
  put there by the worker that sent the request);
- a request whose top Route names one of the workers' own ports: that worker
  (an in-dialog request from a UA that sent it to the shared port);
- any other request: the worker of its user, so that one user's REGISTERs,
  calls and their CANCELs and ACKs all meet the same registrar, nonces and
  transactions.  The user is the To user of a REGISTER and the Request-URI user
  otherwise, resolved from an extension to the user id; a request without a
  user goes by its Call-ID.

``None`` means "whoever received it": a datagram this reader cannot place
(no owner mark, nothing readable) is handled where it landed, and the core
answers or drops it there as it would with one worker.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

WORKER_MARK = ".w"
OUR_BRANCHES = (b"z9hG4bKsr", b"z9hG4bKka")
_VIA = (b"via", b"v")
_TO = (b"to", b"t")
_CALL_ID = (b"call-id", b"i")


@dataclass(frozen=True)
class Steering:
    """How this router's workers share a port: how many, the ports they listen on
    alone (port -> worker), the host names they use, and how a URI user becomes a user id."""

    workers: int
    own_ports: dict[int, int]
    hosts: frozenset[str]
    user_id: Callable[[str], str]

    def owner(self, data: bytes) -> int | None:
        """The index of the worker that must handle ``data``, or None for any."""
        try:
            return self._owner(data)
        except (ValueError, IndexError, UnicodeDecodeError):
            return None

    def of_user(self, user_id: str) -> int:
        """The worker that owns ``user_id`` (stable across processes, unlike ``hash``)."""
        return zlib.crc32(user_id.encode()) % self.workers

    def _owner(self, data: bytes) -> int | None:
        end = data.find(b"\r\n\r\n")
        head = data[:end] if end >= 0 else data
        lines = head.split(b"\r\n")
        first = lines[0]
        if first.startswith(b"SIP/2.0 "):
            via = _header(lines, _VIA)
            return None if via is None else self._marked(via)
        parts = first.split(b" ")
        if len(parts) != 3:
            return None
        route = _header(lines, (b"route",))
        if route is not None:
            owner = self._routed(route)
            if owner is not None:
                return owner
        if parts[0] == b"REGISTER":
            to = _header(lines, _TO)
            user = _uri_user(to) if to is not None else ""
        else:
            user = _uri_user(parts[1])
        if user:
            return self.of_user(self.user_id(user))
        call_id = _header(lines, _CALL_ID)
        return None if call_id is None else zlib.crc32(call_id.strip()) % self.workers

    def _marked(self, via: bytes) -> int | None:
        at = via.find(b"branch=")
        if at < 0:
            return None
        branch = via[at + 7:]
        for stop in (b";", b",", b" "):
            cut = branch.find(stop)
            if cut >= 0:
                branch = branch[:cut]
        if not branch.startswith(OUR_BRANCHES):
            return None
        _, mark, index = branch.rpartition(WORKER_MARK.encode())
        if not mark or not index.isdigit():
            return None
        worker = int(index)
        return worker if worker < self.workers else None

    def _routed(self, route: bytes) -> int | None:
        entry = route.split(b",")[0].strip()
        if entry.startswith(b"<"):
            entry = entry[1:entry.find(b">")]
        text = entry.decode("ascii").split(";")[0]
        if not text.lower().startswith(("sip:", "sips:")):
            return None
        hostport = text.split(":", 1)[1].rpartition("@")[2]
        if hostport.startswith("["):
            host, _, rest = hostport[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = hostport.partition(":")
        if host not in self.hosts or not port_text.isdigit():
            return None
        port = int(port_text)
        return self.own_ports.get(port)


def _header(lines: list[bytes], names: tuple[bytes, ...]) -> bytes | None:
    """The value of the first header line named any of ``names`` (case-insensitive)."""
    for line in lines[1:]:
        colon = line.find(b":")
        if colon > 0 and line[:colon].strip().lower() in names:
            return line[colon + 1:].strip()
    return None


def _uri_user(value: bytes) -> str:
    """The user part of the (first) URI in ``value``: ``"Name" <sip:u@h>;tag=x`` or ``sip:u@h``."""
    text = value.decode("utf-8")
    lt = text.find("<")
    if lt >= 0:
        text = text[lt + 1:text.find(">", lt)]
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.strip().lower() not in ("sip", "sips", "tel"):
        return ""
    if scheme.strip().lower() == "tel":
        return rest.split(";")[0]
    user, at, _ = rest.partition("@")
    return user.split(";")[0] if at else ""
