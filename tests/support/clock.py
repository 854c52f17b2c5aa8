"""A clock a test moves by hand, given to the code under test in place of `time.monotonic`."""

from __future__ import annotations


class Clock:
    """Reads `now`; the test moves it (`clock.now += 10`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
