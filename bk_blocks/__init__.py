"""How to talk to BranchKey: the credentials Block, the client, the archive format."""

from .client import AggregationRef, BranchKeyClient, RunDetails, UploadReply
from .credentials import BranchKeyCredentials
from .errors import (
    AggregationTimeoutError,
    ArchiveRejectedError,
    AuthenticationError,
    BranchKeyError,
    NotFoundError,
    NotificationTimeout,
    OutOfSyncError,
    RequestRefusedError,
    RunNotStartedError,
    RunStoppedError,
    StaleRoundError,
    TransientError,
    UnsafeFileIdError,
)
from .notifications import AggregationNotice
from .settings import BranchKeySettings

__all__ = [
    "AggregationNotice",
    "AggregationRef",
    "AggregationTimeoutError",
    "ArchiveRejectedError",
    "AuthenticationError",
    "BranchKeyClient",
    "BranchKeyCredentials",
    "BranchKeyError",
    "BranchKeySettings",
    "NotFoundError",
    "NotificationTimeout",
    "OutOfSyncError",
    "RequestRefusedError",
    "RunDetails",
    "RunNotStartedError",
    "RunStoppedError",
    "StaleRoundError",
    "TransientError",
    "UnsafeFileIdError",
    "UploadReply",
]
