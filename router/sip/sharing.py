"""Worker processes sharing the router's UDP ports.

With ``workers: N`` each worker binds every UDP ``listen:`` port with
SO_REUSEPORT and reads those sockets itself, without PJSIP.  The kernel hands
each datagram to one of them at random (``spread_at_random``; by default it
would choose by the sender's address, and one busy ACD or trunk would load a
single worker with the steering of all its traffic).  ``Steering`` names the
datagram's owner; a datagram owned by another worker goes to it over a Unix
datagram socket pair the supervisor made before starting the workers, with
the sender's address in front.  Answers always leave from the shared port, so
a phone behind NAT sees them come from the address it registered to; so do
requests to it.  Requests to a device reached at its Contact, with no NAT in
between, leave from the worker's own port (``Send.own_port``): the device
answers there (RFC 3581), straight to the worker that holds the call, and
its answers are not handed over.

The pairs have no name in the file system or the abstract namespace: only the
supervisor's children hold them, so nobody else can inject a datagram with a
forged source.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.policy.model import Listen
from router.sip.pjsip_module import Packet, spread_at_random
from router.sip.steer import Steering

ENV = "SIP_ROUTER_WORKER"          # "<index>/<count>/<inbox fd>,<outbox fd of worker 0>,..."
HANDOFF = b"\x00sr1 "             # never the start of a SIP message
SECRET = b"\x00sr-secret "        # the first datagram in each worker's inbox
SECRET_WAIT = 5.0                  # seconds a starting worker waits for it (it is sent first)
BUFFER = 4 * 1024 * 1024
MAX_DATAGRAM = 65535
# Linux's SO_TIMESTAMPNS (asm-generic/socket.h; Python's socket module does not name it):
# each datagram then carries the kernel's time of arrival, a struct timespec.
SO_TIMESTAMPNS = 35
_STAMP_SPACE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("@qq")


class SharingError(Exception):
    """The worker's inherited channels or shared sockets are not usable."""


@dataclass(frozen=True)
class Channels:
    """The worker's end of its own pair (to read) and the other end of each worker's pair (to write)."""

    index: int
    count: int
    inbox: socket.socket
    outboxes: tuple[socket.socket, ...]
    # The workers' common nonce secret (``send_secret``): a nonce one worker issues is
    # good at every other, so any worker may challenge a REGISTER (see ``Steering``).
    secret: bytes | None = None


def make_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """One (inbox, outbox) pair per worker, made by the supervisor."""
    pairs = []
    for _ in range(count):
        inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        outbox.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        pairs.append((inbox, outbox))
    return pairs


def send_secret(pairs: Sequence[tuple[socket.socket, socket.socket]], secret: bytes) -> None:
    """Put the workers' common nonce secret first in each worker's inbox (before it starts:
    nothing else is there yet).  The pairs are the supervisor's own, so only its children
    can read it; it never appears in an environment or on a command line."""
    for _, outbox in pairs:
        outbox.send(SECRET + secret)


def _read_secret(inbox: socket.socket) -> bytes:
    inbox.settimeout(SECRET_WAIT)
    try:
        packet = inbox.recv(MAX_DATAGRAM)
    except OSError as exc:
        raise SharingError(f"no nonce secret in the worker's inbox: {exc}") from None
    if not packet.startswith(SECRET) or len(packet) <= len(SECRET):
        raise SharingError("the worker's inbox did not start with the nonce secret")
    return packet[len(SECRET):]


def worker_env(index: int, pairs: Sequence[tuple[socket.socket, socket.socket]]) -> tuple[str, list[int]]:
    """The environment value that tells worker ``index`` who it is, and the descriptors to pass it."""
    fds = [pairs[index][0].fileno(), *(outbox.fileno() for _, outbox in pairs)]
    return f"{index}/{len(pairs)}/{','.join(map(str, fds))}", fds


def channels_from_env(value: str) -> Channels:
    try:
        index_text, count_text, fds_text = value.split("/")
        index, count = int(index_text), int(count_text)
        fds = [int(x) for x in fds_text.split(",")]
        if not 0 <= index < count or len(fds) != count + 1:
            raise ValueError(value)
        inbox = socket.socket(fileno=fds[0])
        outboxes = tuple(socket.socket(fileno=fd) for fd in fds[1:])
    except (ValueError, OSError) as exc:
        raise SharingError(f"{ENV}={value!r} is not a worker's channel list: {exc}") from None
    secret = _read_secret(inbox)
    for sock in (inbox, *outboxes):
        sock.setblocking(False)
    return Channels(index, count, inbox, outboxes, secret)


def encode(host: str, port: int, data: bytes, arrived: float | None = None) -> bytes:
    """A datagram handed over: its sender, and when it arrived at the shared port (the
    kernel's stamp; "-" when unknown), so the owner can tell how long it has waited."""
    stamp = b"-" if arrived is None else repr(arrived).encode()
    return b"%s%s %d %s\n%s" % (HANDOFF, host.encode(), port, stamp, data)


def decode(packet: bytes) -> tuple[str, int, bytes, float | None] | None:
    if not packet.startswith(HANDOFF):
        return None
    line, newline, data = packet[len(HANDOFF):].partition(b"\n")
    fields = line.split(b" ")
    if not newline or len(fields) != 3 or not fields[1].isdigit():
        return None
    host, port, stamp = fields
    try:
        arrived = None if stamp == b"-" else float(stamp)
    except ValueError:
        return None
    return host.decode(), int(port), data, arrived


class SharedPorts:
    """The shared sockets of one worker, and the hand-over to the others."""

    def __init__(self, listen: tuple[Listen, ...], steering: Steering, channels: Channels) -> None:
        self.listen = tuple(x for x in listen if x.transport == "udp")
        self.steering = steering
        self.channels = channels
        self.sockets: list[socket.socket] = []
        self.stats = {"handed_over": 0, "handed_in": 0, "handover_dropped": 0}
        self.spread_failure: str | None = None

    @property
    def index(self) -> int:
        return self.channels.index

    def owns(self, user_id: str) -> bool:
        """Is ``user_id`` this worker's user (its bindings, calls and nonces live here)?"""
        return self.steering.of_user(user_id) == self.channels.index

    def bind(self) -> None:
        for entry in self.listen:
            family = socket.AF_INET6 if ":" in entry.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
                sock.bind((entry.address, entry.port))
            except OSError as exc:
                sock.close()
                raise SharingError(f"cannot share udp {entry.address}:{entry.port}: "
                                   f"{exc.strerror or exc}") from None
            sock.setblocking(False)
            stamp_arrivals(sock)
            self.sockets.append(sock)
            try:
                spread_at_random(sock, self.channels.count)
            except OSError as exc:       # the kernel's choice by the sender's address still works
                self.spread_failure = exc.strerror or str(exc)

    def senders(self) -> dict[int, socket.socket]:
        """One shared socket per address family: what answers and requests leave from."""
        out: dict[int, socket.socket] = {}
        for sock in self.sockets:
            out.setdefault(sock.family, sock)
        return out

    def readable(self) -> list[socket.socket]:
        return [*self.sockets, self.channels.inbox]

    def drain(self, ready: list[socket.socket], out: list[tuple[bool, Packet]], limit: int,
              waited_from: float | None = None) -> float | None:
        """Read what ``ready`` holds (at most ``limit`` in all): ours into ``out``, the rest handed
        on.  Returns when the oldest datagram read arrived at a shared port (None: none read, or
        no stamp).
        ``waited_from``: when the loop began to wait (``read_datagrams``)."""
        oldest: float | None = None
        for sock in ready:
            if sock is self.channels.inbox:
                oldest = earliest(oldest, self._drain_inbox(out, limit))
            elif sock in self.sockets:
                oldest = earliest(oldest, self._drain_shared(sock, out, limit, waited_from))
        return oldest

    def _drain_shared(self, sock: socket.socket, out: list[tuple[bool, Packet]], limit: int,
                      waited_from: float | None) -> float | None:
        me = self.channels.index
        arrived: float | None = None
        for index in range(limit):
            try:
                if index:
                    data, address = sock.recvfrom(MAX_DATAGRAM)
                else:                   # the first one waited longest: when did it arrive?
                    data, address, arrived = recv_stamped(sock)
            except (BlockingIOError, InterruptedError):
                return arrived
            except OSError:         # an ICMP error reported on the socket: nothing to read
                return arrived
            host, port = address[0], address[1]
            owner = self.steering.owner(data)
            if owner is None or owner == me:
                out.append(_received(data, host, port))
            else:
                try:
                    # only the first datagram read carries the kernel's stamp (``recv_stamped``)
                    self.channels.outboxes[owner].send(encode(host, port, data, None if index else arrived))
                    self.stats["handed_over"] += 1
                except OSError:         # the owner is gone or far behind: as if the network lost it
                    self.stats["handover_dropped"] += 1
            if not index and woke_the_loop(arrived, waited_from):
                return arrived
        return arrived

    def _drain_inbox(self, out: list[tuple[bool, Packet]], limit: int) -> float | None:
        """The datagrams handed over to this worker; returns when the oldest of them arrived
        at the shared port (None: no stamp)."""
        oldest: float | None = None
        for _ in range(limit):
            try:
                packet = self.channels.inbox.recv(MAX_DATAGRAM + 64)
            except (BlockingIOError, InterruptedError):
                return oldest
            decoded = decode(packet)
            if decoded is None:
                continue
            host, port, data, arrived = decoded
            self.stats["handed_in"] += 1
            out.append(_received(data, host, port))
            oldest = earliest(oldest, arrived)
        return oldest

    def close(self) -> None:
        for sock in (*self.sockets, self.channels.inbox, *self.channels.outboxes):
            try:
                sock.close()
            except OSError:
                pass
        self.sockets.clear()


def read_datagrams(sock: socket.socket, out: list[tuple[bool, Packet]], limit: int,
                   waited_from: float | None = None) -> float | None:
    """Read what waits on the UDP socket ``sock`` into ``out``, up to ``limit`` entries in all
    (PJSIP's own socket: a recvfrom per datagram costs a fraction of PJSIP's poll, parse and
    callback, and the core parses every message itself anyway).  Returns when the first
    (oldest) datagram read arrived, when the socket stamps arrivals (``stamp_arrivals``).
    ``waited_from``: when the loop began to wait (``woke_the_loop``)."""
    arrived: float | None = None
    for index in range(limit - len(out)):
        try:
            if index:
                data, address = sock.recvfrom(MAX_DATAGRAM)
            else:
                data, address, arrived = recv_stamped(sock)
        except OSError:         # nothing left (EAGAIN), or an ICMP error reported on the socket
            return arrived
        out.append(_received(data, address[0], address[1]))
        if not index and woke_the_loop(arrived, waited_from):
            return arrived
    return arrived


def woke_the_loop(arrived: float | None, waited_from: float | None) -> bool:
    """Whether the first datagram read arrived while the loop waited (rather than before it
    began to): then it is read alone.  Under light load a datagram comes by itself, and the
    read that would find the socket empty costs as much as the first (tens of microseconds
    on a processor just woken), before the message is handled; whatever did arrive with it
    makes the next wait return at once, and by then it waited, so that read drains the queue."""
    return arrived is not None and waited_from is not None and arrived >= waited_from


def earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two arrival times, either of which may be unknown (None)."""
    if a is None:
        return b
    return a if b is None or a <= b else b


def stamp_arrivals(sock: socket.socket) -> None:
    """Have the kernel stamp each datagram on ``sock`` with its time of arrival."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        pass                    # not Linux: the overload rule goes by full batches alone


def recv_stamped(sock: socket.socket) -> tuple[bytes, Any, float | None]:
    """One datagram, its sender, and when it arrived (wall clock; None without a stamp)."""
    data, ancillary, _flags, address = sock.recvmsg(MAX_DATAGRAM, _STAMP_SPACE)
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
            seconds, nanoseconds = _TIMESPEC.unpack_from(value)
            return data, address, seconds + nanoseconds / 1e9
    return data, address, None


def _received(data: bytes, host: str, port: int) -> tuple[bool, Packet]:
    """A datagram as the engine takes it in: (is it a response, the packet)."""
    return data.startswith(b"SIP/"), Packet(data, host, port, "udp", 0)


def inherited() -> Channels | None:
    """This process's channels when the supervisor started it as a worker, else None."""
    value = os.environ.get(ENV)
    return channels_from_env(value) if value else None
