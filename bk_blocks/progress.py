"""A transfer's progress in the log, at a rate a person reads: a line at every 10 % of a large
transfer and every 30 s of a long one, never a line per chunk. A slow uplink shows it is alive;
a small, fast transfer says nothing more than its one closing line."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Transfers below this size report by time alone (a line only if one lasts REPORT_EVERY_S).
REPORT_STEPS_FROM_BYTES = 64 * 1024 * 1024
STEP = 0.10
REPORT_EVERY_S = 30.0
MB = 1e6


class TransferProgress:
    """Counts one transfer's bytes and logs its progress: at each `step` of `total` (when it is
    at least `steps_from` bytes) and at least every `every_s` seconds."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter, what: str, total: int | None, *,
                 step: float = STEP, every_s: float = REPORT_EVERY_S, steps_from: int = REPORT_STEPS_FROM_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.what, self.total = log, what, total
        self.done = 0
        self._step = step if total and total >= steps_from else None
        self._every_s, self._clock = every_s, clock
        self._started = self._last = clock()
        self._next_fraction = step

    def add(self, count: int) -> None:
        """`count` more bytes moved; log a line when a step or the interval has passed."""
        self.done += count
        now = self._clock()
        fraction = self.done / self.total if self.total else None
        crossed = self._step is not None and fraction is not None and fraction >= self._next_fraction
        if crossed or now - self._last >= self._every_s:
            if crossed and fraction is not None and self._step is not None:
                while self._next_fraction <= fraction:
                    self._next_fraction += self._step
            if fraction is None or fraction < 1:
                self._report(now, fraction)
            self._last = now

    def _report(self, now: float, fraction: float | None) -> None:
        rate = self.done / MB / max(now - self._started, 1e-9)
        if fraction is None or self.total is None:
            self.log.info("%s: %.1f MB so far (%.1f MB/s)", self.what, self.done / MB, rate)
        else:
            self.log.info("%s: %d %% (%.1f of %.1f MB, %.1f MB/s)", self.what, int(fraction * 100 + 1e-9),
                          self.done / MB, self.total / MB, rate)
