"""The client's exceptions: which failures are worth retrying, and which are final.

`TransientError` covers what a retry can fix (5xx, timeouts, dropped connections,
a notification that has not come yet); everything else is final and carries the
platform's own message. No message ever contains the session token.
"""

from __future__ import annotations


class BranchKeyError(Exception):
    """Base class of every error the BranchKey client raises."""


class TransientError(BranchKeyError):
    """A failure a retry may fix: a 5xx, a timeout, a refused or dropped connection."""


class RequestRefusedError(BranchKeyError):
    """The platform refused the request (a 4xx); retrying the same request will not help."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthenticationError(RequestRefusedError):
    """The leaf's token was refused (401) or the leaf asked about another branch (403)."""


class RunNotStartedError(RequestRefusedError):
    """The branch's run is paused or stopped, so the platform takes no uploads."""

    def __init__(self, message: str, run_status: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message, status_code)
        self.run_status = run_status


class ArchiveRejectedError(RequestRefusedError):
    """The archive is not a valid update (checked locally, or refused by the platform)."""


class NotFoundError(RequestRefusedError):
    """The platform does not know the file or aggregation asked for."""


class UnsafeFileIdError(BranchKeyError, ValueError):
    """A file id that is not a bare name (a path separator or `..`): refused before any request."""


class NotificationTimeout(TransientError):
    """No matching notification arrived within the time allowed."""


class RunStoppedError(BranchKeyError):
    """The branch's run was stopped while the leaf waited: this round will not aggregate."""


class OutOfSyncError(BranchKeyError):
    """The leaf's round is not the platform's: the federation moved on (a missed notice, a leaf
    offline for rounds, a state restored from a backup). The leaf resyncs instead of uploading."""


class StaleRoundError(OutOfSyncError, RequestRefusedError):
    """The platform refused an update trained for a round it has closed (409 `stale_round`)."""


class AggregationTimeoutError(BranchKeyError):
    """The round's upload was not aggregated within the time allowed: a bounded wait that fails
    the round clearly rather than wedging the leaf (not retried; the next run rejoins)."""
