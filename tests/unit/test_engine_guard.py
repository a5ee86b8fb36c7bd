"""The PJSIP thread survives a bug in the core: one bad message is logged, not fatal."""

from __future__ import annotations

from router.sip.engine import Engine
from router.sip.pjsip_module import Packet


class BrokenCore:
    def on_request(self, data, source, now):
        raise KeyError("a bug")

    on_response = on_request

    def handle_timer(self, now):
        raise ValueError("another bug")


class Nothing:
    def replace_many(self, sets):
        pass

    def save_many(self, records):
        pass


def test_a_core_error_is_counted_and_the_engine_goes_on():
    engine = Engine((), BrokenCore(), Nothing(), Nothing())  # type: ignore[arg-type]
    engine._handle(Packet(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "127.0.0.1", 5060, "udp", 0), False)
    engine._handle(Packet(b"SIP/2.0 200 OK\r\n\r\n", "127.0.0.1", 5060, "udp", 0), True)
    engine._guarded(BrokenCore().handle_timer, 0.0)
    assert engine.stats["core_errors"] == 3
