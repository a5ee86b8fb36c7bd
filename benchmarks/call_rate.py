#!/usr/bin/env python3
"""Calls per second through the router, and the post-dial delay it adds, measured with SIPp.

Starts the router with N generated users on loopback.  Two SIPp "device farms"
register one device per user each: the *answer* farm (ip_phone devices: 180,
then 200) and the *ring* farm (app devices: 180, then wait for CANCEL).  A
SIPp caller, trusted as the upstream ACD, then places calls, one user each:

  fork      users on all_devices: both devices ring, one answers, the other is
            cancelled; caller ACKs and hangs up (BYE) at once
  single    users on ip_phone: only the answering device rings
  redirect  the caller is a redirect-mode peer: the router answers 302
  pdd       single-target calls at --rate (default 100/s); prints the INVITE->180
            delay through the router and directly to the device farm, p50/p99,
            and the difference: the delay the router adds

Every process started here is stopped by its PID.  Loopback only.

    .venv/bin/python benchmarks/call_rate.py fork --rate 500 --count 10000
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.sippgen import fork_call_flow, invite_flow  # noqa: E402
from tests.support import DOMAIN, SCENARIOS, RouterProcess, free_port, free_port_run, private_cache, scrape_histogram  # noqa: E402

BUF = str(4 * 1024 * 1024)


def write_config(tmp: Path, port: int, users: int, method: str, redirect: bool,
                 redirect_peer: str | None = None) -> Path:
    """The router's YAML: users u<i> with an ip_phone a<i> and an app b<i> (password p<i>), the ACD
    on 127.0.0.1 trusted (in redirect mode when ``redirect``); ``redirect_peer``: one more trusted
    address, always in redirect mode."""
    extra = f", {{name: acd-redirect, address: {redirect_peer}, mode: redirect}}" if redirect_peer else ""
    lines = [f"domain: {DOMAIN}", f"state_dir: {tmp}", f"listen: [{{address: 127.0.0.1, port: {port}}}]",
             "registrar: {max_bindings_per_device: 1, max_expires: 7200, source_failures_per_minute: 1000000}",
             "routing: {fallback: [], ring_timeout: 30}",
             f"trusted_peers: [{{name: acd, address: 127.0.0.1{', mode: redirect' if redirect else ''}}}{extra}]",
             "log: {level: warning, format: json}", "users:"]
    for i in range(users):
        lines.append(f"  - {{id: u{i}, receive_method: {method}, devices: ["
                     f"{{id: a{i}, kind: ip_phone, password: p{i}}}, {{id: b{i}, kind: app, password: p{i}}}]}}")
    path = tmp / "router.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def farm(tmp: Path, router_port: int, users: int, prefix: str, behaviour: str) -> tuple[subprocess.Popen[bytes], int]:
    rows = ["SEQUENTIAL"] + [f"u{i};{prefix}{i};[authentication username={prefix}{i} password=p{i}]"
                             for i in range(users)]
    data = tmp / f"farm-{prefix}.csv"
    data.write_text("\n".join(rows) + "\n")
    port = free_port()
    out = open(tmp / f"farm-{prefix}.out", "wb")
    proc = subprocess.Popen(
        ["sipp", "-sf", str(SCENARIOS / "device_register.xml"), "-oocsf", str(SCENARIOS / f"uas_{behaviour}.xml"),
         "-inf", str(data), "-m", str(users), "-l", str(users), "-r", "500", "-d", "0",
         "-i", "127.0.0.1", "-p", str(port), "-nostdin", "-buff_size", BUF, "-max_socket", "1000",
         "-watchdog_minor_threshold", "5000", "-watchdog_major_threshold", "10000",
         f"127.0.0.1:{router_port}"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    return proc, port


def wait_registered(config: Path, expected: int, timeout: float = 60.0) -> int:
    import sqlite3
    db = Path(config).parent / "router.db"
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as conn:
                count = conn.execute("SELECT COUNT(*) FROM bindings").fetchone()[0]
            if count >= expected:
                return count
        time.sleep(0.5)
    return count


def caller(tmp: Path, target: str, scenario: Path, rate: int, count: int, users: int,
           rtt: bool = False, address: str = "127.0.0.1",
           data: Path | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    """SIPp runs ``scenario`` from ``address``: ``count`` calls at ``rate``/s, one user of the
    injection file ``data`` each (default: the callees u0..u<users-1>)."""
    if data is None:
        rows = ["SEQUENTIAL"] + [f"u{i}" for i in range(users)]
        data = tmp / "callees.csv"
        data.write_text("\n".join(rows) + "\n")
    cmd = ["sipp", "-sf", str(scenario), "-inf", str(data), "-i", address, "-p", str(free_port()),
           "-r", str(rate), "-m", str(count), "-l", str(max(rate * 4, 100)), "-nostdin", "-buff_size", BUF,
           "-timeout", str(max(60, 3 * count // max(rate, 1))), "-timeout_error", "-default_behaviors", "all",
           "-trace_err", "-error_file", str(tmp / "caller-errors.log"),
           "-watchdog_minor_threshold", "5000", "-watchdog_major_threshold", "10000"]
    if rtt:
        cmd += ["-trace_msg", "-message_file", str(tmp / "caller-messages.log")]
    started = time.monotonic()
    result = subprocess.run([*cmd, target], cwd=tmp, capture_output=True, text=True, timeout=1800)
    return result, time.monotonic() - started


def call_scenario(path: Path, mode: str) -> Path:
    """The caller's SIPp scenario for ``mode`` (fork, single, redirect or pdd), callee from field 0."""
    if mode == "fork":                # either phone may ring first; both 180s may come
        return fork_call_flow(path)
    invite_flow(path, "[field0]", 302 if mode == "redirect" else 200, bye_after_ms=0, ringing=1)
    path.write_text(path.read_text().replace('<pause milliseconds="0"/>\n', ""))
    return path


def totals(out: str) -> tuple[int, int]:
    ok = re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out)
    bad = re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out)
    return (int(ok.group(1)) if ok else 0, int(bad.group(1)) if bad else 0)


def rtt_values(tmp: Path) -> list[float]:
    """INVITE sent -> first 180 received, per call, in ms, from SIPp's microsecond message log."""
    from datetime import datetime
    path = tmp / "caller-messages.log"
    sent: dict[str, datetime] = {}
    values: list[float] = []
    text = path.read_text(errors="replace")
    path.unlink()
    for chunk in text.split("----------------------------------------------- ")[1:]:
        head, _, message = chunk.partition("\n")
        kind, _, message = message.partition("\n")
        message = message.lstrip()
        call_id = re.search(r"^Call-ID: (.+)$", message, re.M)
        if call_id is None:
            continue
        stamp = datetime.strptime(head.strip(), "%Y-%m-%d %H:%M:%S.%f")
        key = call_id.group(1).strip()
        if "sent" in kind and message.startswith("INVITE "):
            sent[key] = stamp
        elif "received" in kind and message.startswith("SIP/2.0 180") and key in sent:
            values.append((stamp - sent.pop(key)).total_seconds() * 1000)
    return values


def router_delay(workers: int) -> list[tuple[float, int]]:
    """The workers' own ``sip_router_message_delay_seconds`` (metrics on 9060 + k), summed:
    (bucket bound, hops at or below it)."""
    total: dict[float, int] = {}
    for k in range(workers):
        for le, n in scrape_histogram("sip_router_message_delay_seconds", 9060 + k):
            total[le] = total.get(le, 0) + n
    return sorted(total.items())


def bound_at(cumulative: list[tuple[float, int]], share: float) -> float:
    """The smallest bucket bound at or below which ``share`` of the observations fell."""
    count = cumulative[-1][1] if cumulative else 0
    return next((le for le, n in cumulative if count and n >= share * count), float("nan"))


def delay_since(before: list[tuple[float, int]], workers: int) -> str | None:
    """The router's own time per hop since ``before`` (``router_delay``), in words; None
    when nothing was measured (Kamailio, or the metrics do not answer)."""
    earlier = dict(before)
    delay = [(le, n - earlier.get(le, 0)) for le, n in router_delay(workers)]
    if not delay or not delay[-1][1]:
        return None
    return (f"the router's own time per hop, from its metric sip_router_message_delay_seconds (every message "
            f"of these calls, {delay[-1][1]} hops): p50 <= {bound_at(delay, 0.5) * 1000:g} ms, "
            f"p99 <= {bound_at(delay, 0.99) * 1000:g} ms")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["fork", "single", "redirect", "pdd"])
    parser.add_argument("--rate", type=int, default=0, help="calls started per second")
    parser.add_argument("--count", type=int, default=0, help="calls in total")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="the router's `workers:`")
    parser.add_argument("--hold", type=float, default=0,
                        help="seconds to keep the router running after the calls (to attach a profiler)")
    args = parser.parse_args()
    rate = args.rate or {"fork": 500, "single": 800, "redirect": 3000, "pdd": 100}[args.mode]
    count = args.count or rate * 10
    with tempfile.TemporaryDirectory(prefix="sip-router-calls-") as name:
        tmp = Path(name)
        private_cache(tmp)
        port = free_port() if args.workers == 1 else free_port_run(args.workers + 1)
        method = "all_devices" if args.mode == "fork" else "ip_phone"
        config = write_config(tmp, port, args.users, method, args.mode == "redirect")
        if args.workers > 1:
            with open(config, "a") as out:
                out.write(f"workers: {args.workers}\n")
        procs: list[subprocess.Popen[bytes]] = []
        with RouterProcess(str(config), port, log_level="warning") as router:
            try:
                answer, answer_port = farm(tmp, port, args.users, "a", "answer")
                procs.append(answer)
                expected = args.users
                if args.mode == "fork":
                    ring, _ = farm(tmp, port, args.users, "b", "ring")
                    procs.append(ring)
                    expected *= 2
                got = wait_registered(config, expected)
                print(f"devices registered: {got}/{expected}")
                scenario = call_scenario(tmp / "caller.xml", args.mode)
                delay_before = router_delay(args.workers)
                result, elapsed = caller(tmp, f"127.0.0.1:{port}", scenario, rate, count, args.users,
                                         rtt=args.mode == "pdd")
                ok, failed = totals(result.stdout)
                print(f"{args.mode}: {ok} calls ok, {failed} failed, offered {rate}/s, "
                      f"achieved {ok / elapsed:.0f} calls/s over {elapsed:.1f} s")
                if args.mode == "pdd":
                    delay = delay_since(delay_before, args.workers)
                    if delay:
                        print(delay)
                    through = rtt_values(tmp)
                    direct_result, _ = caller(tmp, f"127.0.0.1:{answer_port}", scenario, rate,
                                              count, args.users, rtt=True)
                    direct = rtt_values(tmp)
                    for label, values in (("through the router", through), ("direct to the phone", direct)):
                        print(f"INVITE->180 {label}: p50 {pct(values, 50):.2f} ms, "
                              f"p99 {pct(values, 99):.2f} ms ({len(values)} calls)")
                    print(f"post-dial delay added by the router: p50 {pct(through, 50) - pct(direct, 50):.2f} ms, "
                          f"p99 {pct(through, 99) - pct(direct, 99):.2f} ms")
                print(f"router RSS: {router.rss_kib() / 1024:.1f} MiB", flush=True)
                time.sleep(args.hold)
                if failed or ok < count:
                    print(result.stdout[-2500:], file=sys.stderr)
                    errors = tmp / "caller-errors.log"
                    if errors.exists():
                        print("".join(errors.read_text(errors="replace").splitlines(True)[:12]), file=sys.stderr)
                return 0 if failed == 0 and ok == count else 1
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait(5)


if __name__ == "__main__":
    sys.exit(main())
