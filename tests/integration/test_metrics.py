"""The router's Prometheus metrics, scraped over HTTP from the real process and parsed
with prometheus_client's own text parser after a registration, a bad password, a
call rung, answered and hung up, and a reload."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import pytest

from tests.integration.rawsip import UdpPeer
from tests.integration.test_control import RingingCall, registered_desk, scrape, value
from tests.support import ROOT, free_port

pytestmark = pytest.mark.integration

def metrics_on(port: int):
    return lambda text: text + f"metrics: {{address: 127.0.0.1, port: {port}}}\n"


def test_metrics_count_registrations_requests_calls_auth_failures_and_reloads(make_lab):
    port = free_port(socket.SOCK_STREAM)
    lab = make_lab(edit=metrics_on(port))
    with registered_desk(lab) as desk, UdpPeer(lab.port) as acd, UdpPeer(lab.port) as guesser:
        assert guesser.register_with("MD5", "1001", "lan-desk", "wrong").status == 401
        call = RingingCall(lab, acd, desk, "metrics-call-1").ring()
        deadline = time.monotonic() + 3            # the gauges are republished once a second
        while value(scrape(port), "sip_router_calls_in_progress", state="ringing") != 1:
            assert time.monotonic() < deadline, "the ringing call never showed"
            time.sleep(0.2)
        call.answer()
        call.hang_up()
    lab.router.signal(signal.SIGHUP)
    lab.router.wait_for("policy.reloaded")
    samples = scrape(port)

    assert value(samples, "sip_router_registrations", kind="ip_phone", transport="udp") == 1
    assert value(samples, "sip_router_registrations", kind="app", transport="udp") == 0
    assert value(samples, "sip_router_requests_total", method="REGISTER") == 4
    for method in ("INVITE", "ACK", "BYE"):
        assert value(samples, "sip_router_requests_total", method=method) == 1, method
    assert value(samples, "sip_router_responses_total", code_class="1xx", direction="received") == 1
    assert value(samples, "sip_router_responses_total", code_class="2xx", direction="received") == 2
    assert value(samples, "sip_router_responses_total", code_class="4xx", direction="sent") == 3   # 401s
    assert value(samples, "sip_router_calls_total", method="ip_phone", outcome="answered") == 1
    assert value(samples, "sip_router_call_setup_seconds_count") == 1
    assert 0 < value(samples, "sip_router_call_setup_seconds_sum") < 2
    assert value(samples, "sip_router_call_setup_seconds_bucket", le="+Inf") == 1
    assert value(samples, "sip_router_call_ring_seconds_count", outcome="answered") == 1
    assert value(samples, "sip_router_call_ring_seconds_count", outcome="unanswered") == 0
    assert value(samples, "sip_router_auth_failures_total", method="REGISTER", reason="bad_credentials") == 1
    assert value(samples, "sip_router_throttled_requests_total", method="REGISTER") == 0
    assert value(samples, "sip_router_throttled_sources") == 0
    assert value(samples, "sip_router_calls_in_progress", state="ringing") == 0
    assert value(samples, "sip_router_policy_reloads_total", result="reloaded") == 1
    assert value(samples, "sip_router_policy_reloads_total", result="refused") == 0
    assert value(samples, "sip_router_messages_sent_total") >= 10
    (build,) = [labels for (name, labels) in samples if name == "sip_router_build_info"]
    assert dict(build)["version"] and dict(build)["pjsua2"]
    assert not [name for (name, _) in samples if name == "sip_router_trunk_registered"]   # no credentials
    assert value(samples, "process_resident_memory_bytes")
    passes = value(samples, "sip_router_loop_busy_seconds_count")          # the SIP loop's own latency
    assert passes > 0 and value(samples, "sip_router_loop_busy_seconds_bucket", le="+Inf") == passes
    # the router's own time per hop: from each pass's oldest datagram's arrival to its sends
    delayed = value(samples, "sip_router_message_delay_seconds_count")
    assert delayed >= 5 and value(samples, "sip_router_message_delay_seconds_bucket", le="+Inf") == delayed
    assert value(samples, "sip_router_message_delay_seconds_sum") > 0
    # Every series the Grafana dashboard in deploy/ queries is one the router serves.
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(?:sip_router|process)_[a-z_]+", target["expr"])}
    served = {name for (name, _) in samples} | {"sip_router_trunk_registered"}    # shown with credentials
    assert queried and queried <= served, queried - served


def test_metrics_off_serves_nothing_and_the_router_routes_on(make_lab):
    port = free_port(socket.SOCK_STREAM)
    lab = make_lab(edit=lambda text: text + f"metrics: {{enabled: false, port: {port}}}\n")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    with registered_desk(lab):
        pass
    assert not lab.router.events("metrics.listen")
