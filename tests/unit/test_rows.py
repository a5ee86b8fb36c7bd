"""Bindings made of stored rows are the bindings the registrar made."""

from __future__ import annotations

import dataclasses

import pytest

from router.policy.model import Binding, DeviceKind
from router.store.rows import COLUMNS, bindings_of

DESK = Binding("minh", "minh-desk", DeviceKind.IP_PHONE, "sip:minh@192.0.2.7:5071", 2000.0, q=0.5,
               call_id="c1", cseq=7, source_host="192.0.2.7", source_port=5071, transport="tcp",
               user_agent="desk", registered_at=1000.0, instance="<urn:uuid:1>",
               path=("<sip:edge;lr>",), flow="wss", client="203.0.113.9:443", at_contact=True)


def row_of(binding: Binding) -> tuple[object, ...]:
    values = {**{f.name: getattr(binding, f.name) for f in dataclasses.fields(Binding)},
              "kind": binding.kind.value, "at_contact": int(binding.at_contact),
              "path": '["' + '","'.join(binding.path) + '"]' if binding.path else ""}
    return tuple(values[name] for name in COLUMNS)


def test_a_desk_phone_read_back_from_its_row_equals_the_binding_the_registrar_stored():
    (loaded,) = bindings_of([row_of(DESK)])
    assert loaded == DESK and hash(loaded) == hash(DESK) and repr(loaded) == repr(DESK)
    assert loaded.conn == 0 and loaded.at_contact is True and loaded.path == ("<sip:edge;lr>",)


def test_a_loaded_binding_stays_frozen_and_can_be_replaced_like_any_other():
    (loaded,) = bindings_of([row_of(DESK)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.contact = "sip:elsewhere"        # type: ignore[misc]
    assert dataclasses.replace(loaded, user_id="lan").user_id == "lan"


def test_many_phones_share_one_string_per_repeated_value_and_the_policy_ids():
    rows = [row_of(dataclasses.replace(DESK, device_id=f"d{i}", user_id=f"u{i}",
                                       source_host="".join(["192.0.2.", "7"])))     # a new string each
            for i in range(3)]
    own = "".join(["u", "1"])
    made = bindings_of(rows, names={own: own})
    assert made[1].user_id is own
    assert made[0].source_host is made[1].source_host is made[2].source_host
