"""The router's Prometheus metrics: what the PJSIP thread counts, and the endpoint that serves it.

Theory of operation.  The PJSIP thread must never wait for a scrape, so on
its side a metric is a plain ``int`` in a dict of ``Tally`` (no lock, no
prometheus_client object on the per-message path: one dict increment).  The
metrics thread reads those dicts when Prometheus scrapes (``TallyCollector``);
it only copies them, and a dict copy happens under the GIL in one piece, so it
never sees half an update.  Gauges that need a look at the whole state
(registrations are kept incrementally; calls in progress and throttled sources
are counted once a second) are republished by the PJSIP thread as one
immutable ``Gauges`` value, swapped in by a single assignment.

What is counted where (the engine calls these; every argument is something it
already holds): ``received`` and ``sent`` look at the first bytes of each
message; ``event`` reads the core's log commands (auth failures, throttled
sources, an INVITE taken in); ``call_saved`` reads call records (outcome by
receive method, ring time); ``bindings_saved`` follows each device's binding
set (registrations by kind and transport).  The call set-up delay runs from
the INVITE taken in to the first 180/183 sent back to the caller.

``MetricsServer`` serves ``/metrics`` from one thread, one request at a time,
with a socket timeout: a scrape is rare, and a slow client must not pile up
threads.
"""

from __future__ import annotations

import bisect
import platform
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from router import __version__
from router.policy.effective import FIELDS
from router.policy.model import Binding, DeviceKind
from router.records import CallRecord
from router.sip.commands import Log, SaveBindings

SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
LOOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DELAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1.0)
RING_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0)
MAX_PENDING_SETUPS = 10_000      # INVITEs waiting for their first 180/183; the oldest are forgotten
SETUP_GIVE_UP = 300.0            # seconds: an INVITE with no 180/183 by then is not measured
SCRAPE_TIMEOUT = 5.0             # seconds a scraper may take to send its request

_METHODS = {m.encode(): m for m in ("INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "SUBSCRIBE",
                                    "NOTIFY", "MESSAGE", "INFO", "PUBLISH", "REFER", "UPDATE", "PRACK")}
_CLASSES = {str(n).encode(): f"{n}xx" for n in range(1, 7)}
TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")


def outcome(record: CallRecord) -> str:
    """What happened to a call, in a few words a dashboard can group by."""
    status = record.status
    if 200 <= status < 300:
        return "answered"
    if status == 302:
        return "redirected"
    if status == 487:
        return "cancelled"
    if status in (486, 600):
        return "busy"
    if status == 603:
        return "declined"
    if status in (408, 480):
        return "no_answer" if record.branches else "unavailable"
    if status == 404:
        return "not_found"
    return "failed"


class Buckets:
    """A histogram as plain counts, for one writer thread (the scrape reads a copy)."""

    def summary(self) -> dict[str, object]:
        """Count, and the upper bound below which 50 %, 99 % and all passes fell (seconds)."""
        total = sum(self.counts)
        out: dict[str, object] = {"count": total}
        for name, share in (("p50_le", 0.5), ("p99_le", 0.99), ("max_le", 1.0)):
            running, bound = 0, None
            for limit, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
                running += count
                if total and running >= share * total:
                    bound = limit if limit != float("inf") else "+Inf"
                    break
            out[name] = bound
        return out

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)      # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str, labels: dict[str, str] | None = None,
               into: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family = into or HistogramMetricFamily(name, documentation, labels=list(labels or {}))
        family.add_metric(list((labels or {}).values()), cumulative, total)
        return family


@dataclass(frozen=True)
class Gauges:
    """What the PJSIP thread republishes once a second (one immutable value)."""

    ringing: int = 0
    answered: int = 0
    throttled_sources: int = 0
    trunk_registered: bool | None = None      # None: no trunk registration configured


# The Call-ID of a message we built ourselves (one header per line), without parsing all of it.
_CALL_ID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:([^\r\n]*)", re.IGNORECASE)


@dataclass
class Tally:
    """The PJSIP thread's counters: written only by it, read by the scrape and the control socket."""

    requests: dict[str, int] = field(default_factory=dict)              # received, by method
    responses_received: dict[str, int] = field(default_factory=dict)    # by class
    responses_sent: dict[str, int] = field(default_factory=dict)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)     # (receive method, outcome)
    auth_failures: dict[tuple[str, str], int] = field(default_factory=dict)   # (method, reason)
    throttled: dict[str, int] = field(default_factory=dict)             # requests refused, by method
    reloads: dict[str, int] = field(default_factory=dict)               # by result
    runtime_changes: dict[str, int] = field(default_factory=dict)       # by field
    registrations: dict[tuple[str, str], int] = field(default_factory=dict)   # (kind, transport)
    setup: Buckets = field(default_factory=lambda: Buckets(SETUP_BUCKETS))
    loop: Buckets = field(default_factory=lambda: Buckets(LOOP_BUCKETS))   # busy time per loop pass
    # per pass: from its oldest datagram's arrival (the kernel's stamp) to what the pass sent having left
    delay: Buckets = field(default_factory=lambda: Buckets(DELAY_BUCKETS))
    ring: dict[str, Buckets] = field(default_factory=lambda: {"answered": Buckets(RING_BUCKETS),
                                                               "unanswered": Buckets(RING_BUCKETS)})
    gauges: Gauges = field(default_factory=Gauges)
    invites: dict[str, float] = field(default_factory=dict)             # call id -> taken in at
    # device -> the (kind, transport) of each of its bindings; the few distinct pairs are
    # shared objects (the registrations dict's own keys), and so are the few distinct
    # tuples of them (``key_sets``): no tuple per device.
    by_device: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    key_sets: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = field(default_factory=dict)

    # ------------------------------------------------------------ per message
    def received(self, data: bytes) -> None:
        if data.startswith(b"SIP/2.0 "):
            key = _CLASSES.get(data[8:9], "other")
            self.responses_received[key] = self.responses_received.get(key, 0) + 1
        else:
            method = _METHODS.get(data[:data.find(b" ", 0, 12)], "other")
            self.requests[method] = self.requests.get(method, 0) + 1

    def sent(self, data: bytes) -> None:
        if not data.startswith(b"SIP/2.0 "):
            return
        key = _CLASSES.get(data[8:9], "other")
        self.responses_sent[key] = self.responses_sent.get(key, 0) + 1
        if self.invites and data[8:11] in (b"180", b"183"):
            self._first_ring(data, time.time())

    def _first_ring(self, data: bytes, now: float) -> None:
        """Only a 180/183 toward a caller still waiting for one is parsed: once per call."""
        found = _CALL_ID.search(data)
        if found is None:
            return
        started = self.invites.pop(found.group(1).strip().decode(errors="replace"), None)
        if started is not None:
            self.setup.observe(max(now - started, 0.0))

    # ------------------------------------------------------------ per command
    def event(self, log: Log) -> None:
        """The core's log commands that say something countable."""
        if log.event == "register.auth":
            result = dict(log.fields).get("result")
            if result in ("bad", "bad_final"):
                self._bump(self.auth_failures, ("REGISTER", "bad_credentials"))
            elif result == "locked":
                self._bump(self.auth_failures, ("REGISTER", "locked"))
            elif result == "throttled":
                self._bump(self.throttled, "REGISTER")
        elif log.event == "call.refused":
            detail = str(dict(log.fields).get("detail", ""))
            if detail.startswith("bad credentials"):
                self._bump(self.auth_failures, ("INVITE", "bad_credentials"))
            elif detail.endswith("sent too many bad credentials"):
                self._bump(self.throttled, "INVITE")
        elif log.event == "call.received":
            call_id = dict(log.fields).get("call_id")
            if isinstance(call_id, str):
                if len(self.invites) >= MAX_PENDING_SETUPS:
                    del self.invites[next(iter(self.invites))]
                self.invites[call_id] = time.time()

    def call_saved(self, record: CallRecord) -> None:
        """A call record: counted once, when the call is answered or fails."""
        if record.answered_at is not None and record.ended_at is not None:
            return                            # the BYE of a call counted when it was answered
        self.invites.pop(record.call_id, None)
        method = record.method.split(">", 1)[0] or "none"
        self._bump(self.calls, (method, outcome(record)))
        if record.answered_at is not None:
            self.ring["answered"].observe(max(record.answered_at - record.started_at, 0.0))
        elif record.branches and record.ended_at is not None:
            self.ring["unanswered"].observe(max(record.ended_at - record.started_at, 0.0))

    def bindings_saved(self, save: SaveBindings) -> None:
        for key in self.by_device.pop(save.device_id, ()):
            self.registrations[key] -= 1
        keys = tuple(self._count(b) for b in save.bindings)
        if keys:
            self.by_device[save.device_id] = self._shared(keys)

    def bindings_loaded(self, bindings: Iterable[Binding]) -> None:
        """Count what the router starts with (as ``bindings_saved`` would, device by device).
        One pass, with the key of each (kind, transport) pair looked up once per pair, not
        once per binding: 100,000 bindings take ~15 ms, not ~50 ms, before the first message."""
        keys: dict[tuple[object, str, str], tuple[str, str]] = {}     # (kind, transport, flow) -> key
        by_device = self.by_device
        for b in bindings:
            key = keys.get((b.kind, b.transport, b.flow))
            if key is None:
                key = keys[(b.kind, b.transport, b.flow)] = self._key(b)
            self._add(key)
            known = by_device.get(b.device_id)
            by_device[b.device_id] = self._shared((key,) if known is None else (*known, key))

    def _shared(self, keys: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """One tuple object per distinct set of keys: a handful, not one per device."""
        return self.key_sets.setdefault(keys, keys)

    def _count(self, binding: Binding) -> tuple[str, str]:
        key = self._key(binding)
        self._add(key)
        return key

    def _add(self, key: tuple[str, str]) -> None:
        self.registrations[key] = self.registrations.get(key, 0) + 1

    def _key(self, binding: Binding) -> tuple[str, str]:
        key = (binding.kind.value, binding.device_transport)
        for known in self.registrations:          # a handful of pairs: reuse the stored key
            if known == key:
                return known
        return key

    def sweep(self, now: float) -> None:
        """Forget INVITEs that never rang (oldest first: the dict is in arrival order)."""
        while self.invites:
            call_id, started = next(iter(self.invites.items()))
            if now - started < SETUP_GIVE_UP:
                break
            del self.invites[call_id]

    @staticmethod
    def _bump(counts: dict[str, int] | dict[tuple[str, str], int], key: str | tuple[str, str]) -> None:
        counts[key] = counts.get(key, 0) + 1  # type: ignore[index,arg-type]

    # ------------------------------------------------------------ views
    def registrations_by_kind(self) -> dict[str, int]:
        out = {kind.value: 0 for kind in DeviceKind}
        for (kind, _), n in dict(self.registrations).items():
            out[kind] = out.get(kind, 0) + n
        return out

    def registrations_by_transport(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, transport), n in dict(self.registrations).items():
            if n:
                out[transport] = out.get(transport, 0) + n
        return out


def _counter(name: str, documentation: str, labels: list[str],
             values: Mapping[Any, int], known: Iterable[str | tuple[str, str]] = ()) -> CounterMetricFamily:
    """A counter family; the ``known`` label values are shown from 0, so that the first
    increment is a visible rise for ``rate()`` rather than a new series."""
    counts: dict[str | tuple[str, str], int] = dict.fromkeys(known, 0)
    counts.update(dict(values))
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in counts.items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


class TallyCollector(Collector):
    """Turns a ``Tally`` (and the engine's plain counters) into metric families at scrape time."""

    def __init__(self, tally: Tally, stats: dict[str, int], started_at: float) -> None:
        self.tally = tally
        self.stats = stats
        self.started_at = started_at
        self.info = {"version": version(), "python": platform.python_version(), "pjsua2": _pjsua2_version()}

    def collect(self) -> Iterator[Metric]:
        t = self.tally
        build = GaugeMetricFamily("sip_router_build_info", "The running sip-router's version (always 1).",
                                  labels=list(self.info))
        build.add_metric(list(self.info.values()), 1)
        yield build
        yield GaugeMetricFamily("sip_router_start_time_seconds", "When the router started (Unix time).",
                                value=self.started_at)
        registrations = GaugeMetricFamily("sip_router_registrations",
                                          "Registered contacts now, by device kind and transport.",
                                          labels=["kind", "transport"])
        current = dict(t.registrations)
        for device_kind in DeviceKind:
            for transport in TRANSPORTS:
                current.setdefault((device_kind.value, transport), 0)
        for (kind, transport), n in sorted(current.items()):
            registrations.add_metric([kind, transport], n)
        yield registrations
        yield _counter("sip_router_requests", "SIP requests received, by method.", ["method"], t.requests,
                       ("INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS"))
        responses = CounterMetricFamily("sip_router_responses", "SIP responses received from peers and "
                                        "sent by the router, by status class.", labels=["code_class", "direction"])
        for direction, counts in (("received", t.responses_received), ("sent", t.responses_sent)):
            by_class = dict.fromkeys(_CLASSES.values(), 0) | dict(counts)
            for key, value in by_class.items():
                responses.add_metric([key, direction], value)
        yield responses
        stats = dict(self.stats)
        yield CounterMetricFamily("sip_router_messages_sent", "SIP messages sent.", value=stats.get("sent", 0))
        yield CounterMetricFamily("sip_router_send_errors", "SIP messages that could not be sent.",
                                  value=stats.get("send_errors", 0))
        yield CounterMetricFamily("sip_router_calls_shed", "New calls answered 503 because the router was "
                                  "behind (overload).", value=stats.get("shed", 0))
        yield _counter("sip_router_calls", "Calls routed, counted at the answer or the final failure, by the "
                       "receive method of their first step and outcome.", ["method", "outcome"], t.calls)
        yield t.loop.family("sip_router_loop_busy_seconds",
                            "How long one pass of the SIP loop worked between two polls: a stall here delays "
                            "every message waiting in the socket buffer.")
        yield t.delay.family("sip_router_message_delay_seconds",
                             "From a datagram's arrival at the router's socket (the kernel's stamp) to when the "
                             "requests and answers it caused had left, for the oldest datagram of each pass of "
                             "the SIP loop: the router's own share of a call's post-dial delay, hop by hop "
                             "(an answer that waits for its state to be stored leaves later).")
        yield t.setup.family("sip_router_call_setup_seconds",
                             "From the INVITE taken in to the first 180/183 sent back to the caller.")
        ring = HistogramMetricFamily("sip_router_call_ring_seconds", "From the INVITE taken in to the answer "
                                     "(answered) or to giving up (unanswered, some device was rung).",
                                     labels=["outcome"])
        for name, buckets in t.ring.items():
            buckets.family("", "", {"outcome": name}, into=ring)
        yield ring
        yield _counter("sip_router_auth_failures", "Bad digest credentials and locked usernames, by method.",
                       ["method", "reason"], t.auth_failures,
                       (("REGISTER", "bad_credentials"), ("REGISTER", "locked"), ("INVITE", "bad_credentials")))
        yield _counter("sip_router_throttled_requests", "Requests refused because their source sent too many "
                       "bad credentials, by method.", ["method"], t.throttled, ("REGISTER", "INVITE"))
        g = t.gauges
        yield GaugeMetricFamily("sip_router_throttled_sources", "Source addresses refused now for bad "
                                "credentials in the last minute.", value=g.throttled_sources)
        calls_now = GaugeMetricFamily("sip_router_calls_in_progress", "Calls ringing or answered now.",
                                      labels=["state"])
        calls_now.add_metric(["ringing"], g.ringing)
        calls_now.add_metric(["answered"], g.answered)
        yield calls_now
        if g.trunk_registered is not None:
            yield GaugeMetricFamily("sip_router_trunk_registered", "1 while the router is registered to the "
                                    "PSTN trunk (present when a trunk registration is configured).",
                                    value=1 if g.trunk_registered else 0)
        yield _counter("sip_router_policy_reloads", "YAML policy reloads (SIGHUP or `sip-router reload`), "
                       "by result.", ["result"], t.reloads, ("reloaded", "refused"))
        yield _counter("sip_router_policy_runtime_changes", "Run-time changes picked up (CLI, web app), by field.",
                       ["field"], t.runtime_changes, FIELDS)


def version() -> str:
    """The installed package's version (the source tree's when run from a checkout)."""
    try:
        return metadata.version("sip-router")
    except metadata.PackageNotFoundError:
        return __version__


def _pjsua2_version() -> str:
    try:
        return metadata.version("pjsua2-python")
    except metadata.PackageNotFoundError:
        return "unknown"


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT          # a client that sends nothing is dropped, not waited for

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base class's name
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """``/metrics`` on ``address:port``, served one request at a time from its own thread."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self.registry = registry
        self.address = address
        self.port = port
        self.log = log
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        """Listen and serve; False (logged with the address) when the port cannot be had."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET

        class Server(WSGIServer):
            address_family = family
            allow_reuse_address = True

        try:
            self.server = make_server(self.address, self.port, make_wsgi_app(self.registry),
                                      server_class=Server, handler_class=_QuietHandler)
        except OSError as exc:
            self.log.error("metrics.listen.failed", address=self.address, port=self.port,
                           detail=exc.strerror or str(exc),
                           hint="another process uses the port; set metrics.port, or metrics.enabled: false")
            return False
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.25},
                                       name="metrics", daemon=True)
        self.thread.start()
        self.log.info("metrics.listen", address=self.address, port=self.port, path="/metrics")
        return True

    def close(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()            # returns once serve_forever has stopped (within its poll interval)
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(2.0)
        self.server = None


def registry_for(tally: Tally, stats: dict[str, int], started_at: float) -> CollectorRegistry:
    """The router's own registry (not the library's global one): the tally, and the
    process's CPU, memory and descriptors read from /proc at scrape time."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TallyCollector(tally, stats, started_at))
    ProcessCollector(registry=registry)
    return registry
