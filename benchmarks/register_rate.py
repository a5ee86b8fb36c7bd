#!/usr/bin/env python3
"""Registrations per second with digest, measured with SIPp against the real router.

Starts the router on a loopback port with N generated users (one device each),
drives it with SIPp at a fixed rate (every call = REGISTER, 401, REGISTER with
credentials, 200; each call a different user), and prints the achieved rate,
failures and retransmissions.  Loopback only; the router is stopped by PID.

    .venv/bin/python benchmarks/register_rate.py --rate 4000 --count 40000
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support import RouterProcess, free_port, private_cache, scrape_histogram, write_users_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=4000, help="registrations started per second")
    parser.add_argument("--count", type=int, default=40000, help="registrations in total")
    parser.add_argument("--users", type=int, default=10000, help="distinct users (one device each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sip-router-bench-") as tmp:
        private_cache(tmp)
        port = free_port()
        config, csv = write_users_config(tmp, port, args.users)
        router = RouterProcess(config, port, log_level="warning")
        router.start(timeout=max(15.0, args.users / 2000))        # 100,000 users: ~25 s to load
        try:
            sipp_port = free_port()
            started = time.monotonic()
            cmd = ["sipp", "-sf", os.path.join(ROOT, "tests/scenarios/register_digest.xml"),
                   "-inf", csv, "-i", "127.0.0.1", "-p", str(sipp_port),
                   "-r", str(args.rate), "-m", str(args.count), "-l", str(args.rate * 4),
                   "-timeout", str(max(30, args.count // max(args.rate, 1) * 3)), "-timeout_error",
                   "-nostdin", "-buff_size", str(4 * 1024 * 1024), "-trace_stat", "-stf", os.path.join(tmp, "stat.csv"),
                   f"127.0.0.1:{port}"]
            result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
            elapsed = time.monotonic() - started
            rss = router.rss_kib()
            loop = _loop_busy()
        finally:
            router.stop()
        out = result.stdout
        if result.returncode not in (0, 1):
            print(out[-2000:], result.stderr[-2000:], file=sys.stderr)
        ok = _total(out, "Successful call")
        failed = _total(out, "Failed call")
        rate = ok / elapsed if elapsed else 0.0
        print(f"registrations: {ok} ok, {failed} failed, in {elapsed:.2f} s")
        print(f"offered rate:  {args.rate}/s   achieved: {rate:.0f} registrations/s with digest")
        print(f"router RSS after run: {rss / 1024:.1f} MiB for {args.users} users")
        if loop:
            print("SIP loop passes by busy time (s): " + ", ".join(f"<={le}: {n}" for le, n in loop if n))
        return 0 if failed == 0 and ok == args.count else 1


def _loop_busy() -> list[tuple[str, int]]:
    """The router's own histogram of SIP-loop pass times, as (bucket bound, passes in it)."""
    cumulative = scrape_histogram("sip_router_loop_busy_seconds")
    return [(f"{le:g}", n - (cumulative[i - 1][1] if i else 0)) for i, (le, n) in enumerate(cumulative)]


def _total(out: str, label: str) -> int:
    match = re.search(rf"{label}\s+\|\s+\d+\s+\|\s+(\d+)", out)
    return int(match.group(1)) if match else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
