"""Bindings made of the state database's rows, the way a router start needs them.

A start makes one ``Binding`` per stored row: 100,000 of them with as many registered
phones, before the first message is answered.  Two things make that cheaper:

- Ids, addresses, transports and user agents repeat across thousands of bindings: one
  string object each, not one per row (and not in the interpreter's interned table,
  which would keep every id for good).
- A frozen dataclass's ``__init__`` sets each of its 19 fields through
  ``object.__setattr__`` (~3.3 us a binding); the slots are set here directly (~2 us),
  and every field is set, so the object is the one ``__init__`` would make.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from router.policy.model import Binding, DeviceKind

# The order the columns are read in, and the slots they fill (``conn`` is never stored).
COLUMNS = ("user_id", "device_id", "kind", "contact", "expires_at", "q", "call_id", "cseq",
           "source_host", "source_port", "transport", "user_agent", "registered_at", "instance",
           "path", "flow", "client", "at_contact")
_FILLED = (*COLUMNS, "conn")
if sorted(_FILLED) != sorted(f.name for f in dataclasses.fields(Binding)):
    raise ImportError("router.store.rows does not fill every field of Binding: update COLUMNS")
_SET = {name: getattr(Binding, name).__set__ for name in _FILLED}


def bindings_of(rows: Iterable[tuple[Any, ...]], names: Mapping[str, str] | None = None) -> list[Binding]:
    """A ``Binding`` of each row of ``COLUMNS``; ``names``: the policy's own id strings,
    which the bindings then share."""
    kinds = {k.value: k for k in DeviceKind}
    ids: Mapping[str, str] = names if names is not None else {}
    common: dict[str, str] = {}          # the other repeated values, and ids the policy lacks
    same = common.setdefault
    (user_id, device_id, kind, contact, expires_at, q, call_id, cseq, source_host, source_port,
     transport, user_agent, registered_at, instance, path, flow, client, at_contact, conn) = (
        _SET[name] for name in _FILLED)
    new = object.__new__
    made: list[Binding] = []
    add = made.append
    for r in rows:
        b = new(Binding)
        user_id(b, ids.get(r[0]) or same(r[0], r[0]))
        device_id(b, ids.get(r[1]) or same(r[1], r[1]))
        kind(b, kinds[r[2]])
        contact(b, r[3])
        expires_at(b, r[4])
        q(b, 1.0 if r[5] == 1.0 else r[5])              # one 1.0 object, not one per row
        call_id(b, r[6])
        cseq(b, r[7])
        source_host(b, same(r[8], r[8]))
        source_port(b, r[9])
        transport(b, same(r[10], r[10]))
        user_agent(b, same(r[11], r[11]))
        registered_at(b, r[12])
        instance(b, r[13])
        path(b, tuple(json.loads(r[14])) if r[14] else ())
        flow(b, same(r[15], r[15]))
        client(b, r[16])
        at_contact(b, bool(r[17]))
        conn(b, 0)
        add(b)
    return made
