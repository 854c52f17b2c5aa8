"""When a waiting task reads the platform's run details: the way back beside the notices.

A wait for an aggregation or for combined statistics reads the run details every `interval_s`,
at once after a reconnect of the listener (a notice may have come while it was down) and after a
run status notice since the round's mark (a stopped run ends the wait within a second, not at
the next timed check). A check that cannot reach the platform is one logged outage, not a
failure: the wait goes on until its own deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect_branchkey.bk_blocks import BranchKeyClient, RunDetails, TransientError
from prefect_branchkey.bk_blocks.outages import OutageLog


class RunChecks:
    """The run checks of one wait (`what`, for the log) on `client`'s listener.

    `status_notices_at_mark` is how many run status notices had come when the round was marked
    (`LeafSession.status_notices_at_mark`; None when it was not), so that a stop between the
    upload and the wait makes the first check due at once; `at_once` makes it due regardless.
    """

    def __init__(self, client: BranchKeyClient, status_notices_at_mark: int | None, interval_s: float,
                 what: str, at_once: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock
        self._interval_s = interval_s
        self._outage = OutageLog(f"run check while {what} waits", client.log)
        self._connections = client.connections
        self._status_notices = client.run_status_notices if status_notices_at_mark is None else status_notices_at_mark
        self._next = clock() + (0.0 if at_once else interval_s)

    def seconds_to_next(self) -> float:
        """How long until the next timed check (0 or less: due)."""
        return self._next - self._clock()

    def due(self) -> bool:
        """Whether to read the run details now: the timed check is due, the listener reconnected
        or a run status notice came since the last check."""
        return (self.seconds_to_next() <= 0 or self._client.connections != self._connections
                or self._client.run_status_notices != self._status_notices)

    def read(self) -> RunDetails | None:
        """The run details, or None when the platform could not be asked (logged as an outage);
        the next timed check is `interval_s` after this one."""
        self._connections, self._status_notices = self._client.connections, self._client.run_status_notices
        try:
            details = self._client.run_details()
        except TransientError as exc:
            self._outage.failed(str(exc))
            return None
        finally:
            self._next = self._clock() + self._interval_s
        self._outage.ended()
        return details
