"""Random identifiers: tags, branches, nonces; cryptographically random, cheap.

RFC 3261 §19.3 asks for tags and branches that are cryptographically random.
``os.urandom`` is, but one ``getrandom()`` system call per identifier showed in
the profile of a busy router.  The bytes come from a pool that ``os.urandom``
refills 4 KiB at a time; each byte is handed out once.  Like the rest of the
core it is used from one thread (the SIP thread), so it takes no lock.  A forked child starts
with an empty pool, so parent and child never hand out the same bytes.
"""

from __future__ import annotations

import os

POOL_SIZE = 4096

_pool = b""
_at = 0


def token_bytes(count: int) -> bytes:
    global _pool, _at
    if _at + count > len(_pool):
        _pool, _at = os.urandom(max(POOL_SIZE, count)), 0
    out = _pool[_at:_at + count]
    _at += count
    return out


def token_hex(count: int) -> str:
    """``count`` random bytes as 2 * ``count`` hex digits (like ``secrets.token_hex``)."""
    return token_bytes(count).hex()


def _forget() -> None:
    global _pool, _at
    _pool, _at = b"", 0


os.register_at_fork(after_in_child=_forget)
