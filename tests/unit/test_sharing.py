"""Two workers on one shared UDP port hand each datagram to its owner (``router.sip.sharing``)."""

from __future__ import annotations

import os
import select
import socket
import time
import zlib

from router.policy.model import Listen
from router.sip.sharing import (
    Channels,
    SharedPorts,
    SharingError,
    channels_from_env,
    decode,
    encode,
    make_pairs,
    send_secret,
    worker_env,
)
from router.sip.steer import Steering
from tests.support import free_port_run


def workers(port: int) -> list[SharedPorts]:
    pairs = make_pairs(2)
    steering = Steering(2, {port + 1: 0, port + 2: 1}, frozenset({"127.0.0.1"}), lambda u: u)
    out = []
    for index in range(2):
        channels = Channels(index, 2, pairs[index][0], tuple(outbox for _, outbox in pairs))
        for sock in (channels.inbox, *channels.outboxes):
            sock.setblocking(False)
        shared = SharedPorts((Listen("127.0.0.1", port),), steering, channels)
        shared.bind()
        out.append(shared)
    return out


def register(user: str) -> bytes:
    return (f"REGISTER sip:pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n"
            f"To: <sip:{user}@pbx.test>\r\nCall-ID: {user}-1\r\nContent-Length: 0\r\n\r\n").encode()


def test_a_handed_over_datagram_keeps_its_source():
    assert decode(encode("::1", 5060, b"SIP/2.0 200 OK\r\n")) == ("::1", 5060, b"SIP/2.0 200 OK\r\n", None)
    # with the time it arrived at the shared port (the kernel's stamp), exactly
    assert decode(encode("127.0.0.1", 5062, b"BYE x SIP/2.0\r\n", 1796002156.582377882)) == \
        ("127.0.0.1", 5062, b"BYE x SIP/2.0\r\n", 1796002156.582377882)
    assert decode(b"REGISTER sip:x SIP/2.0\r\n") is None       # a SIP message is never taken for one


def test_whichever_worker_the_kernel_picks_the_users_own_worker_gets_the_register():
    """Sent from one socket (as an ACD does), two REGISTERs of users of different workers."""
    port = free_port_run(3)
    pair = workers(port)
    users = {"lan": zlib.crc32(b"lan") % 2, "minh": zlib.crc32(b"minh") % 2}
    assert set(users.values()) == {0, 1}
    got: list[list[tuple[bool, object]]] = [[], []]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind(("127.0.0.1", 0))
        sent_at = time.time()
        stamps: list[float | None] = []
        # One at a time: each read then holds one datagram, the one the kernel stamped (a
        # read of several stamps only its first, and hands the others over unstamped).
        for done, user in enumerate(users, start=1):
            phone.sendto(register(user), ("127.0.0.1", port))
            for _ in range(20):                               # bounded: one datagram, at most two hops
                for index, shared in enumerate(pair):
                    ready = select.select(shared.readable(), [], [], 0.05)[0]
                    if ready:
                        stamps.append(shared.drain(ready, got[index], 10))  # type: ignore[arg-type]
                if sum(map(len, got)) == done:
                    break
        source = phone.getsockname()
    try:
        for user, owner in users.items():
            (is_response, packet), = [p for p in got[owner] if f"To: <sip:{user}@".encode() in p[1].data]  # type: ignore[attr-defined]
            assert not is_response and (packet.host, packet.port) == source  # type: ignore[attr-defined]
        # the kernel picks a worker at random: whatever it handed over arrived
        assert sum(s.stats["handed_over"] for s in pair) == sum(s.stats["handed_in"] for s in pair)
        # each read, of the shared port or of what was handed over, knows when its datagrams
        # reached the shared port: the owner can tell how long a handed-over one has waited
        assert stamps and all(stamp is not None and sent_at - 0.01 <= stamp <= time.time() for stamp in stamps)
        assert all(s.spread_failure is None for s in pair)
    finally:
        for shared in pair:
            shared.close()


def worker_channels(index: int, pairs: list[tuple[socket.socket, socket.socket]]) -> Channels:
    """What worker ``index`` makes of its environment, on copies of the descriptors it inherits."""
    _, fds = worker_env(index, pairs)
    return channels_from_env(f"{index}/{len(pairs)}/{','.join(str(os.dup(fd)) for fd in fds)}")


def close_all(pairs: list[tuple[socket.socket, socket.socket]], *channels: Channels) -> None:
    for sock in (*(s for pair in pairs for s in pair), *(s for c in channels for s in (c.inbox, *c.outboxes))):
        sock.close()


def test_every_worker_reads_the_same_nonce_secret_first_from_its_inbox():
    pairs = make_pairs(2)
    send_secret(pairs, b"k" * 32)
    found = [worker_channels(index, pairs) for index in range(2)]
    try:
        assert [c.secret for c in found] == [b"k" * 32, b"k" * 32]
        assert [c.index for c in found] == [0, 1]
    finally:
        close_all(pairs, *found)


def test_a_worker_whose_inbox_lacks_the_secret_refuses_to_start():
    pairs = make_pairs(1)
    pairs[0][1].send(encode("127.0.0.1", 5060, b"OPTIONS sip:x SIP/2.0\r\n\r\n"))
    try:
        worker_channels(0, pairs)
    except SharingError as exc:
        assert "nonce secret" in str(exc)
    else:
        raise AssertionError("a worker started without the nonce secret")
    finally:
        close_all(pairs)
