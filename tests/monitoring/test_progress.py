"""The one progress throttle: by step of the total, by time, and always the end."""

from __future__ import annotations

import pytest

from kaapana_assets.progress import throttled


def test_step_reports_each_quarter_once_and_the_end() -> None:
    seen: list[tuple[int, int]] = []
    progress = throttled(lambda done, total: seen.append((done, total)), step=0.25)
    for done in range(0, 101, 5):
        progress(done, 100)
    assert seen == [(25, 100), (50, 100), (75, 100), (100, 100)]


def test_a_jump_over_several_steps_reports_once() -> None:
    seen: list[tuple[int, int]] = []
    progress = throttled(lambda done, total: seen.append((done, total)), step=0.25)
    for done in (10, 60, 70, 80, 99, 100):
        progress(done, 100)
    # 60 passes 25 % and 50 % at once: one report; the next is at 75 %.
    assert seen == [(60, 100), (80, 100), (100, 100)]


def test_fractions_that_do_not_divide_evenly_report_once() -> None:
    seen: list[tuple[int, int]] = []
    progress = throttled(lambda done, total: seen.append((done, total)), step=0.1)
    for done in range(11):
        progress(done, 10)
    assert seen == [(d, 10) for d in range(1, 11)]


def test_interval_throttles_but_never_the_end() -> None:
    now = [0.0]
    seen: list[tuple[int, int]] = []
    progress = throttled(lambda done, total: seen.append((done, total)), interval_s=1.0, clock=lambda: now[0])
    for done in range(1, 11):
        progress(done, 10)
        now[0] += 0.4
    # t=0.0 → 1, t=1.2 → 4, t=2.4 → 7, then the end at t=3.6 (less than 1 s after 7).
    assert seen == [(1, 10), (4, 10), (7, 10), (10, 10)]


def test_no_throttle_reports_every_new_value_and_never_twice() -> None:
    seen: list[tuple[int, int]] = []
    progress = throttled(lambda done, total: seen.append((done, total)))
    for done in (1, 1, 2, 3, 3, 3):
        progress(done, 3)
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_empty_total_is_finished() -> None:
    seen: list[tuple[int, int]] = []
    throttled(lambda done, total: seen.append((done, total)), step=0.5, interval_s=10)(0, 0)
    assert seen == [(0, 0)]


@pytest.mark.parametrize("kwargs", [{"step": 1.5}, {"step": -0.1}, {"interval_s": -1.0}])
def test_invalid_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        throttled(lambda done, total: None, **kwargs)
