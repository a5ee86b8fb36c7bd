"""The SIP loop gathers datagrams only under load (router.sip.pacing)."""

from router.sip.pacing import Pacing


def test_at_ordinary_rates_each_datagram_is_read_as_it_comes() -> None:
    pacing = Pacing(gap=0.003, above=2000, window=0.1)
    now = 100.0
    for _ in range(50):                  # 10 datagrams a second: far below the threshold
        pacing.passed(1, now)
        assert pacing.pause(now) == 0.0
        now += 0.1
    assert not pacing.gathering


def test_under_load_a_pass_begins_a_gap_after_the_previous_one() -> None:
    pacing = Pacing(gap=0.003, above=2000, window=0.1)
    now = 100.0
    for _ in range(101):                 # 5 datagrams every millisecond: 5,000 a second
        pacing.passed(5, now)
        now += 0.001
    assert pacing.gathering
    began = now
    pacing.passed(5, began)
    assert abs(pacing.pause(began + 0.001) - 0.002) < 1e-9     # 1 ms after it began: 2 ms more
    assert pacing.pause(began + 0.0035) == 0.0     # the gap is over: read at once


def test_gathering_ends_within_a_window_of_the_load_falling() -> None:
    pacing = Pacing(gap=0.003, above=2000, window=0.1)
    now = 100.0
    for _ in range(101):
        pacing.passed(5, now)
        now += 0.001
    assert pacing.gathering
    for _ in range(3):                   # then one datagram every 50 ms
        now += 0.05
        pacing.passed(1, now)
    assert not pacing.gathering
    assert pacing.pause(now) == 0.0


def test_the_rate_is_measured_over_the_whole_window() -> None:
    pacing = Pacing(gap=0.003, above=2000, window=0.125)      # binary fractions: exact sums
    pacing.passed(200, 0.0)              # one burst of 200, then quiet: 1,600 a second
    pacing.passed(0, 0.125)
    assert not pacing.gathering
    pacing.passed(300, 0.1875)
    pacing.passed(0, 0.25)               # 300 in the next window: 2,400 a second
    assert pacing.gathering
