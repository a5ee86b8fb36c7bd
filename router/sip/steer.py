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
- a REGISTER without credentials, when the workers share one nonce secret
  (``challenge_anywhere``): whoever received it.  Its answer is a 401 that needs
  no state of the user's, and the nonce in it is good at the user's worker,
  which gets the REGISTER that carries the credentials: half the first
  REGISTERs of a log-in wave are then not handed over;
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

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from router.userhash import user_hash

WORKER_MARK = ".w"
OUR_BRANCHES = (b"z9hG4bKsr", b"z9hG4bKka")
# A header line, by its full or compact name, case-insensitive (RFC 3261 §7.3.1): the
# first match is the first such header.  A search in C over the header block costs a
# fraction of splitting it into lines in Python.


def _line(*names: str) -> re.Pattern[bytes]:
    alternatives = "|".join(re.escape(n) for n in names).encode()
    return re.compile(rb"\r\n(?:" + alternatives + rb")[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


_VIA = _line("via", "v")
_TO = _line("to", "t")
_CALL_ID = _line("call-id", "i")
_ROUTE = _line("route")
_AUTHORIZATION = re.compile(rb"\r\nauthorization[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class Steering:
    """How this router's workers share a port: how many, the ports they listen on
    alone (port -> worker), the host names they use, and how a URI user becomes a user id."""

    workers: int
    own_ports: dict[int, int]
    hosts: frozenset[str]
    user_id: Callable[[str], str]
    challenge_anywhere: bool = False     # the workers share a nonce secret

    def owner(self, data: bytes) -> int | None:
        """The index of the worker that must handle ``data``, or None for any."""
        try:
            return self._owner(data)
        except (ValueError, IndexError, UnicodeDecodeError):
            return None

    def of_user(self, user_id: str) -> int:
        """The worker that owns ``user_id``."""
        return user_hash(user_id) % self.workers

    def _owner(self, data: bytes) -> int | None:
        end = data.find(b"\r\n\r\n")
        head = data[:end] if end >= 0 else data
        eol = head.find(b"\r\n")
        first = head[:eol] if eol >= 0 else head
        if first.startswith(b"SIP/2.0 "):
            via = _VIA.search(head)
            return None if via is None else self._marked(via.group(1))
        parts = first.split(b" ")
        if len(parts) != 3:
            return None
        route = _ROUTE.search(head)
        if route is not None:
            owner = self._routed(route.group(1))
            if owner is not None:
                return owner
        if parts[0] == b"REGISTER":
            if self.challenge_anywhere and _AUTHORIZATION.search(head) is None:
                return None
            to = _TO.search(head)
            user = _uri_user(to.group(1)) if to is not None else ""
        else:
            user = _uri_user(parts[1])
        if user:
            return self.of_user(self.user_id(user))
        call_id = _CALL_ID.search(head)
        return None if call_id is None else zlib.crc32(call_id.group(1).strip()) % self.workers

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
