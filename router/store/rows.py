"""Bindings made of the state database's rows, the way a router start needs them.

A start makes one ``Binding`` per stored row: 100,000 of them with as many registered
phones, before the first message is answered.  Ids, addresses, transports and user
agents repeat across thousands of bindings: one string object each, not one per row
(and not in the interpreter's interned table, which would keep every id for good).
Each binding is made by ``build_binding``, which sets its slots straight, as users are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from router.policy.model import Binding, DeviceKind, build_binding

# The order the columns are read in (every field of ``Binding`` but ``conn``, never stored).
COLUMNS = ("user_id", "device_id", "kind", "contact", "expires_at", "q", "call_id", "cseq",
           "source_host", "source_port", "transport", "user_agent", "registered_at", "instance",
           "path", "flow", "client", "at_contact")


def bindings_of(rows: Iterable[tuple[Any, ...]], names: Mapping[str, str] | None = None) -> list[Binding]:
    """A ``Binding`` of each row of ``COLUMNS``; ``names``: the policy's own id strings,
    which the bindings then share."""
    kinds = {k.value: k for k in DeviceKind}
    ids: Mapping[str, str] = names if names is not None else {}
    common: dict[str, str] = {}          # the other repeated values, and ids the policy lacks
    same = common.setdefault
    return [build_binding(ids.get(r[0]) or same(r[0], r[0]), ids.get(r[1]) or same(r[1], r[1]), kinds[r[2]],
                          r[3], r[4], 1.0 if r[5] == 1.0 else r[5],     # one 1.0 object, not one per row
                          r[6], r[7], same(r[8], r[8]), r[9], same(r[10], r[10]), same(r[11], r[11]),
                          r[12], r[13], 0, tuple(json.loads(r[14])) if r[14] else (), same(r[15], r[15]),
                          r[16], bool(r[17]))
            for r in rows]
