"""Throughput accounting: tokens/s, MFU, step time and data wait between metric flushes, with evaluation
time left out, and the run's summary from all but the first interval (which pays for warm-up)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, NamedTuple


class Interval(NamedTuple):
    tokens_per_s: float
    mfu: float
    step_time_s: float
    data_wait_s: float  # per step


class Throughput:
    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.intervals: list[tuple[int, float]] = []  # (steps, seconds) per flush
        self._start, self._data_wait = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self._data_wait += time.perf_counter() - t0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation) counts towards no interval."""
        t0 = time.perf_counter()
        yield
        self._start += time.perf_counter() - t0

    def mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.peak_flops

    def record(self, steps: int) -> Interval:
        """Close the interval of the last `steps` steps and start the next."""
        elapsed = time.perf_counter() - self._start
        self.intervals.append((steps, elapsed))
        tokens_per_s = self.tokens_per_step * steps / elapsed
        interval = Interval(tokens_per_s, self.mfu(tokens_per_s), elapsed / steps, self._data_wait / steps)
        self._start, self._data_wait = time.perf_counter(), 0.0
        return interval

    def summary(self) -> Interval:
        """Over every interval but the first (NaN when no step ran)."""
        measured = self.intervals[1:] or self.intervals
        steps = sum(n for n, _ in measured)
        seconds = sum(s for _, s in measured)
        if not steps:
            return Interval(*(float("nan"),) * 4)
        tokens_per_s = self.tokens_per_step * steps / seconds
        return Interval(tokens_per_s, self.mfu(tokens_per_s), seconds / steps, float("nan"))
