"""An outage logged at a sane rate, however long it lasts.

A connection or check that keeps failing (a broker down for an hour, a platform API that does
not answer while a leaf waits overnight) says so once as a warning, then reminds every
`REMINDER_S` seconds (never a line per attempt), and says once when it is back.
"""

from __future__ import annotations

import logging
import time


class OutageLog:
    """The log lines of one thing's outages (`what`, e.g. "websocket notifications")."""

    REMINDER_S = 300.0

    def __init__(self, what: str, logger: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
        self.what = what
        self.log = logger
        self.attempts = 0
        self.started = 0.0
        self.reminded = 0.0

    def failed(self, error: str, retry_in_s: float | None = None) -> None:
        """One failed attempt: a warning if it starts an outage or a reminder is due, else debug."""
        now = time.monotonic()
        self.attempts += 1
        if self.attempts == 1:
            self.started = self.reminded = now
            retry = "" if retry_in_s is None else f" in {retry_in_s:.1f} s"
            self.log.warning("%s interrupted (%s); retrying%s", self.what, error, retry)
        elif now - self.reminded >= self.REMINDER_S:
            self.reminded = now
            self.log.warning("%s still failing after %.0f s and %d attempts (%s); still retrying",
                             self.what, now - self.started, self.attempts, error)
        else:
            self.log.debug("%s: attempt %d failed (%s)", self.what, self.attempts, error)

    def ended(self) -> None:
        """A success: ends the outage (one line if there was one)."""
        if self.attempts:
            self.log.info("%s back after %.0f s and %d failed attempts",
                          self.what, time.monotonic() - self.started, self.attempts)
        self.attempts = 0
