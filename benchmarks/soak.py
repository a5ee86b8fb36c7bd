#!/usr/bin/env python3
"""Soak: forked calls at a steady rate for a long time; failures, memory and descriptors.

Starts the router on loopback with N generated users on ``all_devices`` (one ip_phone
and one app each), two SIPp device farms (the ip_phones answer, the apps ring until
cancelled) and one SIPp caller, trusted as the ACD, placing ``--rate`` calls a second
for ``--duration`` seconds: both phones ring, one answers, the router cancels the
other, the caller hangs up (BYE).  Every ``--sample`` seconds it reads the router's
VmRSS and open descriptors from /proc; it prints them, the calls that succeeded and
failed, and the growth from the first sample after ``--warmup`` (the proxy keeps an
ended call 32 s for retransmissions, so memory reaches its steady state after that)
to the last.  Every process started here is stopped by its PID.  Loopback only.

    .venv/bin/python benchmarks/soak.py --duration 3600 --rate 50
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.peers import SippFarm  # noqa: E402
from tests.integration.sippgen import fork_call_flow  # noqa: E402
from tests.support import RouterProcess, count_bindings, free_port, private_cache, proc_usage, write_fork_config  # noqa: E402

BUF = str(4 * 1024 * 1024)


@dataclass
class SoakResult:
    calls: int                       # calls offered
    ok: int = 0
    failed: int = 0
    elapsed: float = 0.0
    samples: list[tuple[float, int, int]] = field(default_factory=list)   # (seconds, RSS KiB, fds)
    warm: tuple[float, int, int] | None = None
    end: tuple[float, int, int] | None = None
    router_errors: list[str] = field(default_factory=list)
    caller_output: str = ""

    @property
    def rss_growth_kib(self) -> int:
        return self.end[1] - self.warm[1] if self.warm and self.end else 0

    @property
    def fd_change(self) -> int:
        return self.end[2] - self.warm[2] if self.warm and self.end else 0

    def report(self, samples: bool = True) -> str:
        lines = [f"soak: {self.ok} calls ok, {self.failed} failed of {self.calls} offered "
                 f"in {self.elapsed:.0f} s ({self.ok / max(self.elapsed, 1e-9):.1f} calls/s)"]
        if samples:
            lines += [f"  t={t:6.1f} s  RSS {rss / 1024:7.1f} MiB  fds {fds}" for t, rss, fds in self.samples]
        if self.warm and self.end:
            lines.append(f"after warm-up (t={self.warm[0]:.0f} s): RSS {self.warm[1] / 1024:.1f} MiB, "
                         f"{self.warm[2]} fds; end (t={self.end[0]:.0f} s): RSS {self.end[1] / 1024:.1f} MiB, "
                         f"{self.end[2]} fds; growth {self.rss_growth_kib / 1024:+.1f} MiB, "
                         f"{self.fd_change:+d} fds")
        if self.router_errors:
            lines.append(f"router errors: {len(self.router_errors)}, first: {self.router_errors[0][:300]}")
        return "\n".join(lines)


def totals(out: str) -> tuple[int, int]:
    ok = re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out)
    bad = re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out)
    return (int(ok.group(1)) if ok else 0, int(bad.group(1)) if bad else 0)


def soak(directory: Path, duration: float, rate: int, users: int = 50, warmup: float = 40.0,
         sample: float = 5.0, echo: bool = False) -> SoakResult:
    """Run the soak in ``directory``; everything started is stopped before returning."""
    port = free_port()
    config = write_fork_config(str(directory), port, users)
    count = max(1, int(duration * rate))
    result = SoakResult(calls=count)
    farms: list[SippFarm] = []
    caller: subprocess.Popen[str] | None = None
    router = RouterProcess(config, port)
    try:
        router.start()
        for prefix, behaviour in (("a", "answer"), ("b", "ring")):
            farms.append(SippFarm(directory, port, users, prefix, behaviour).start())
        deadline = time.monotonic() + 60
        while count_bindings(directory / "router.db") < 2 * users and time.monotonic() < deadline:
            time.sleep(0.25)
        registered = count_bindings(directory / "router.db")
        if registered < 2 * users:
            raise RuntimeError(f"only {registered} of {2 * users} devices registered")
        rows = ["SEQUENTIAL"] + [f"u{i}" for i in range(users)]
        (directory / "callees.csv").write_text("\n".join(rows) + "\n")
        scenario = fork_call_flow(directory / "soak-caller.xml")
        cmd = ["sipp", "-sf", str(scenario), "-inf", str(directory / "callees.csv"), "-i", "127.0.0.1",
               "-p", str(free_port()), "-r", str(rate), "-m", str(count), "-l", str(max(rate * 4, 50)),
               "-nostdin", "-buff_size", BUF, "-timeout", str(int(duration + 120)), "-timeout_error",
               "-default_behaviors", "all", "-trace_err", "-error_file", str(directory / "caller-errors.log"),
               "-watchdog_minor_threshold", "5000", "-watchdog_major_threshold", "10000",
               f"127.0.0.1:{port}"]
        started = time.monotonic()
        caller = subprocess.Popen(cmd, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        next_sample = started + sample
        stop_at = started + duration + 150            # bounded, whatever SIPp does
        while caller.poll() is None and time.monotonic() < stop_at:
            time.sleep(max(0.0, min(0.5, next_sample - time.monotonic())))
            now = time.monotonic()
            if now >= next_sample and caller.poll() is None:
                rss, fds = proc_usage(router.pid)
                point = (now - started, rss, fds)
                result.samples.append(point)
                if echo:
                    print(f"  t={point[0]:6.1f} s  RSS {rss / 1024:7.1f} MiB  fds {fds}", flush=True)
                if result.warm is None and point[0] >= warmup:
                    result.warm = point
                if point[0] <= duration:
                    result.end = point
                next_sample += sample
        if caller.poll() is None:
            caller.kill()
        out, _ = caller.communicate(timeout=30)
        result.elapsed = time.monotonic() - started
        result.caller_output = out
        result.ok, result.failed = totals(out)
        result.router_errors = [line for line in router.log_text().splitlines()
                                if '"level": "error"' in line or "Traceback" in line]
        if router.proc is not None and router.proc.poll() is not None:
            result.router_errors.append(f"the router exited with {router.proc.returncode}")
        return result
    finally:
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.wait(5)
        for farm in farms:
            farm.stop()
        router.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of calls")
    parser.add_argument("--rate", type=int, default=25, help="calls started per second")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--warmup", type=float, default=40, help="seconds before the baseline sample")
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep its logs (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="sip-router-soak-")) as name:
        private_cache(name)
        result = soak(Path(name), args.duration, args.rate, args.users, min(args.warmup, args.duration / 2),
                      args.sample, echo=True)
        print(result.report(samples=False))
        if result.failed or result.ok < result.calls:
            print(result.caller_output[-2500:], file=sys.stderr)
            errors = Path(name) / "caller-errors.log"
            if errors.exists():
                print("".join(errors.read_text(errors="replace").splitlines(True)[:12]), file=sys.stderr)
        return 0 if result.failed == 0 and result.ok == result.calls and not result.router_errors else 1


if __name__ == "__main__":
    sys.exit(main())
