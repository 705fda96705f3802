"""Progress of a long loop, reported at most every so often: the CLI's bar and the ingest
asset's log lines share this one throttle."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Progress = Callable[[int, int], None]
"""`progress(done, total)`: what `ingest_files(progress=...)` and other long loops call."""

# Fractions like 0.3 / 0.1 come out as 2.999…: without a little slack a step would report twice.
_SLACK = 1e-9


def throttled(report: Progress, *, step: float = 0.0, interval_s: float = 0.0,
              clock: Callable[[], float] = time.monotonic) -> Progress:
    """`report`, called only when `done` has reached the next multiple of `step` (a fraction of
    `total`: 0.25 reports at 25 %, 50 %, 75 %) and `interval_s` seconds have passed since the
    last report. The end (`done >= total`) is always reported, so a bar ends full and a log
    ends with the total; the same `done` is never reported twice."""
    if not 0.0 <= step <= 1.0:
        raise ValueError(f"step is a fraction of the total, 0 to 1: {step}")
    if interval_s < 0:
        raise ValueError(f"interval_s must not be negative: {interval_s}")
    last_done: int | None = None
    last_time = -math.inf
    next_fraction = step  # the first report is at the first step, not at 0 %

    def progress(done: int, total: int) -> None:
        nonlocal last_done, last_time, next_fraction
        if done == last_done:
            return
        finished = done >= total
        fraction = done / total if total > 0 else 1.0
        now = clock()
        if not finished and (fraction + _SLACK < next_fraction or now - last_time < interval_s):
            return
        report(done, total)
        last_done, last_time = done, now
        if step:
            next_fraction = (math.floor(fraction / step + _SLACK) + 1) * step

    return progress
