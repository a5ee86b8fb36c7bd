"""The SIP core's shared vocabulary: where a request came from, what to answer,
and the commands the pure core hands the engine (send bytes, log a line,
persist a record).  Every module of the core speaks these types; none of them
defines its own.  ``PHRASES`` is the one table of reason phrases.

The types made for every message (``Source``, ``Send``, ``Log``) are immutable
named tuples: a frozen dataclass sets each field through ``object.__setattr__``
and cost four times as much to make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from router.policy.model import Binding
from router.records import CallRecord


class Source(NamedTuple):
    """Where a request came from, as the transport saw it."""

    host: str
    port: int
    transport: str = "udp"
    conn: int = 0            # opaque handle of the TCP connection, 0 for UDP
    # Behind the edge: the device's own address and transport, as the edge stamped them
    # (believed only in requests from the edge's internal address).
    client_host: str = ""
    client_port: int = 0
    client_transport: str = ""
    # As a destination: a device reached at its Contact, with no NAT in between, whose
    # answers may come to the port our Via names (a worker's own port) -- see ``Send.own_port``.
    direct: bool = False

    @property
    def origin_host(self) -> str:
        """Who sent it: the edge's client, or the packet's source."""
        return self.client_host or self.host

    @property
    def origin_port(self) -> int:
        return self.client_port if self.client_host else self.port

    @property
    def via_edge(self) -> bool:
        return bool(self.client_host)


@dataclass(frozen=True, slots=True)
class Reply:
    """A response the core answers itself: status, phrase and extra headers."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


class Send(NamedTuple):
    """Bytes to put on the wire, to ``host:port`` over ``transport`` (``conn``: a held TCP transport).

    ``own_port``: with several workers, a request may leave from the worker's own port
    rather than the shared one.  A device answers to where the request came from (RFC
    3581), so its answers then reach the worker that holds the transaction straight away,
    without being read by another worker and handed over.  Only for a device reached at
    its Contact (``Source.direct``): one behind a NAT is reached only through the mapping
    its REGISTER opened to the shared port."""

    data: bytes
    host: str
    port: int
    transport: str = "udp"
    conn: int = 0
    own_port: bool = False


def send_to(dest: Source, data: bytes) -> Send:
    """A request to ``dest``: over its transport and held connection, from the worker's own
    port when it is reached at its Contact (``Source.direct``)."""
    return Send(data, dest.host, dest.port, dest.transport, dest.conn, dest.direct)


class Log(NamedTuple):
    """A structured log line; calls carry their call_id in ``fields``."""

    event: str
    fields: tuple[tuple[str, object], ...] = ()
    level: str = "info"


@dataclass(frozen=True, slots=True)
class SaveCall:
    """Insert or update this call's record."""

    record: CallRecord


@dataclass(frozen=True, slots=True)
class SaveBindings:
    """Persist: ``bindings`` is now the whole set of the device's bindings."""

    user_id: str
    device_id: str
    bindings: tuple[Binding, ...]


Command = Send | SaveBindings | SaveCall | Log


# The reason phrase the router writes for each status it originates (RFC 3261 §21).
PHRASES: dict[int, str] = {
    100: "Trying", 200: "OK", 302: "Moved Temporarily",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 407: "Proxy Authentication Required", 408: "Request Timeout",
    416: "Unsupported URI Scheme", 423: "Interval Too Brief",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist", 482: "Loop Detected",
    483: "Too Many Hops", 487: "Request Terminated",
    500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
}


def phrase(status: int) -> str:
    """The reason phrase for ``status``; a class default for codes not in the table."""
    found = PHRASES.get(status)
    if found is not None:
        return found
    return {1: "Session Progress", 2: "OK", 3: "Redirect", 4: "Request Failure",
            5: "Server Error", 6: "Global Failure"}.get(status // 100, "Unknown")
