"""The hash that shares users among workers.

A user belongs to the worker its hash names (``router.sip.steer``), and each binding
row keeps its user's hash (``router.store.sqlite``), so that a worker reads only its
own rows at start.  Both use this one function: stable across processes and
versions, unlike ``hash``.
"""

from __future__ import annotations

import zlib


def user_hash(user_id: str) -> int:
    """The CRC-32 of the user id's UTF-8 bytes (0 to 2**32 - 1)."""
    return zlib.crc32(user_id.encode())
