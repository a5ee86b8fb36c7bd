"""The side-by-side benchmark's stepping: a step that is not clean is run once more."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks import compare
from benchmarks.compare import Run, Side, step_rates


class QuietServer:
    name = "server"


def runs(outcomes: dict[int, list[int]]) -> tuple[Any, list[tuple[int, int]]]:
    """A run function whose successive runs at each rate fail the given numbers of calls."""
    calls: list[tuple[int, int]] = []

    def run(rate: int, count: int) -> Run:
        calls.append((rate, count))
        failed = outcomes[rate].pop(0)
        return Run(rate, count, count - failed, failed, 10.0, 1.0)
    return run, calls


@pytest.fixture(autouse=True)
def no_settling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare, "settle", lambda _server: None)


def test_one_lost_call_that_does_not_repeat_does_not_end_the_stepping() -> None:
    side = Side()
    run, calls = runs({100: [0], 200: [1, 0], 300: [0]})
    step_rates(QuietServer(), side, "single", (100, 200, 300), 10, run)  # type: ignore[arg-type]
    assert [rate for rate, _ in calls] == [100, 200, 200, 300]
    assert side.max_rate["single"] == (300, ">= 300")


def test_a_step_that_fails_twice_ends_the_stepping_at_the_rate_before() -> None:
    side = Side()
    run, calls = runs({100: [0], 200: [1, 3], 300: [0]})
    step_rates(QuietServer(), side, "single", (100, 200, 300), 10, run)  # type: ignore[arg-type]
    assert [rate for rate, _ in calls] == [100, 200, 200]
    assert side.max_rate["single"] == (100, "100")
    assert [step.clean for step in side.steps["single"]] == [True, False, False]
