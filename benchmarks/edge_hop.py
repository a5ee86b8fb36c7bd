#!/usr/bin/env python3
"""What the Kamailio edge costs: post-dial delay of its hop, and registrations per second through it.

Starts the router (N generated users) and the edge rendered from its `edge:` section
(Kamailio only; rtpengine is not involved in calls without a browser), on loopback.

  pdd       a SIPp device farm registers straight to the router and answers; a SIPp
            caller, trusted as the ACD, places single-target calls at --rate (100/s),
            first straight to the router, then through the edge's UDP listener.  Prints
            INVITE->180 p50/p99 for both and the difference: the delay the edge hop adds.
  register  REGISTER + 401 + REGISTER with digest + 200, one user per call, at --rate,
            through the edge (--transport udp, or tcp: one connection per registration),
            then straight to the router for comparison.

Every process started here is stopped by its PID.  Loopback only.

    .venv/bin/python benchmarks/edge_hop.py pdd --rate 100 --count 3000
    .venv/bin/python benchmarks/edge_hop.py register --rate 1000 --count 10000 --transport tcp
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.call_rate import caller, farm, pct, rtt_values, totals, wait_registered, write_config  # noqa: E402
from tests.integration.edge import EdgeLab  # noqa: E402
from tests.integration.sippgen import invite_flow  # noqa: E402
from tests.support import RouterProcess, free_port, private_cache, write_users_config  # noqa: E402


def edge_yaml(internal_port: int, listen_port: int) -> str:
    return (f"edge:\n  address: 127.0.0.1\n  udp: {listen_port}\n  tcp: {listen_port}\n  tls: off\n"
            f"  wss: off\n  internal_address: 127.0.0.2\n  internal_port: {internal_port}\n  rtpengine: off\n")


def pdd(args: argparse.Namespace, tmp: Path) -> int:
    port, edge_port = free_port(), free_port(socket.SOCK_STREAM)
    config = write_config(tmp, port, args.users, "ip_phone", False)
    config.write_text(config.read_text() + edge_yaml(free_port(), edge_port))
    procs: list[subprocess.Popen[bytes]] = []
    with RouterProcess(str(config), port, log_level="warning"), EdgeLab(config, tmp / "edge"):
        try:
            answer, _ = farm(tmp, port, args.users, "a", "answer")
            procs.append(answer)
            print(f"devices registered: {wait_registered(config, args.users)}/{args.users}")
            scenario = invite_flow(tmp / "caller.xml", "[field0]", 200, bye_after_ms=0)
            scenario.write_text(scenario.read_text().replace('<pause milliseconds="0"/>\n', ""))
            results = {}
            for label, target in (("straight to the router", port), ("through the edge", edge_port)):
                result, elapsed = caller(tmp, f"127.0.0.1:{target}", scenario, args.rate, args.count,
                                         args.users, rtt=True)
                ok, failed = totals(result.stdout)
                values = rtt_values(tmp)
                results[label] = values
                print(f"{label}: {ok} calls ok, {failed} failed at {args.rate}/s; INVITE->180 "
                      f"p50 {pct(values, 50):.2f} ms, p99 {pct(values, 99):.2f} ms ({len(values)} calls)")
                if failed or ok < args.count:
                    print(result.stdout[-2000:], file=sys.stderr)
                    return 1
            direct, edged = results["straight to the router"], results["through the edge"]
            print(f"post-dial delay added by the edge hop: p50 {pct(edged, 50) - pct(direct, 50):.2f} ms, "
                  f"p99 {pct(edged, 99) - pct(direct, 99):.2f} ms")
            return 0
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(5)


def register(args: argparse.Namespace, tmp: Path) -> int:
    port, edge_port = free_port(), free_port(socket.SOCK_STREAM)
    config_path, csv = write_users_config(str(tmp), port, args.users)
    config = Path(config_path)
    # SIPp is one address doing the work of thousands of phones: as a trusted peer it is exempt
    # from the edge's per-address flood limit (pike), so this measures relaying, not limiting.
    config.write_text(config.read_text() + edge_yaml(free_port(), edge_port)
                      + "trusted_peers: [{name: load, address: 127.0.0.1}]\n")
    status = 0
    with RouterProcess(str(config), port, log_level="warning"), EdgeLab(config, tmp / "edge"):
        for label, target, transport in (("through the edge", edge_port, args.transport),
                                         ("straight to the router", port, "udp")):
            cmd = ["sipp", "-sf", str(ROOT / "tests/scenarios/register_digest.xml"), "-inf", csv,
                   "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_STREAM)),
                   "-t", "tn" if transport == "tcp" else "u1", "-max_socket", "4000",
                   "-r", str(args.rate), "-m", str(args.count), "-l", str(args.rate * 4),
                   "-timeout", str(max(30, args.count // max(args.rate, 1) * 3)), "-timeout_error",
                   "-nostdin", "-buff_size", str(4 * 1024 * 1024), f"127.0.0.1:{target}"]
            started = time.monotonic()
            result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
            elapsed = time.monotonic() - started
            ok, failed = totals(result.stdout)
            print(f"{label} ({transport}): {ok} ok, {failed} failed in {elapsed:.1f} s; offered {args.rate}/s, "
                  f"achieved {ok / elapsed:.0f} registrations/s with digest")
            if failed or ok < args.count:
                print(result.stdout[-1500:], file=sys.stderr)
                status = 1
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["pdd", "register"])
    parser.add_argument("--rate", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    args = parser.parse_args()
    args.rate = args.rate or {"pdd": 100, "register": 1000}[args.mode]
    args.count = args.count or args.rate * 20
    with tempfile.TemporaryDirectory(prefix="sip-router-edge-") as name:
        private_cache(name)
        return pdd(args, Path(name)) if args.mode == "pdd" else register(args, Path(name))


if __name__ == "__main__":
    sys.exit(main())
