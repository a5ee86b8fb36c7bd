"""A two-minute soak in the test suite: forked calls at a modest steady rate through the
real router; no call fails, and the router's memory and open descriptors stay flat.

The longer run is ``benchmarks/soak.py --duration SECONDS --rate N`` (same driver).
``SIP_ROUTER_SOAK_SECONDS`` shortens the run while working on it; the suite runs 120 s.
"""

from __future__ import annotations

import os
import shutil

import pytest
from benchmarks.soak import soak

pytestmark = pytest.mark.integration

DURATION = float(os.environ.get("SIP_ROUTER_SOAK_SECONDS", "120"))
RATE = 25                       # calls a second: 2 phones ring, one answers, one is cancelled, BYE
RSS_GROWTH_KIB = 10 * 1024
FD_TOLERANCE = 2


def test_two_minutes_of_forked_calls_fail_none_and_leak_neither_memory_nor_descriptors(tmp_path):
    if shutil.which("sipp") is None:
        pytest.fail("sipp is not installed: run scripts/test, which installs Debian's sip-tester")
    result = soak(tmp_path, DURATION, RATE, users=50, warmup=min(40.0, DURATION / 3), sample=5.0)
    print("\n" + result.report())
    assert not result.router_errors, result.router_errors[:5]
    assert result.failed == 0 and result.ok == result.calls, result.caller_output[-2500:]
    assert result.warm is not None and result.end is not None and result.end[0] > result.warm[0]
    assert result.rss_growth_kib < RSS_GROWTH_KIB, result.report()
    assert abs(result.fd_change) <= FD_TOLERANCE, result.report()
