"""How to talk to BranchKey: the credentials Block, the client, the archive format."""

from .client import BranchKeyClient, RunDetails
from .credentials import BranchKeyCredentials
from .errors import (
    ArchiveRejectedError,
    AuthenticationError,
    BranchKeyError,
    NotFoundError,
    NotificationTimeout,
    RequestRefusedError,
    RunNotStartedError,
    RunStoppedError,
    TransientError,
    UnsafeFileIdError,
)
from .notifications import AggregationNotice
from .settings import BranchKeySettings

__all__ = [
    "AggregationNotice",
    "ArchiveRejectedError",
    "AuthenticationError",
    "BranchKeyClient",
    "BranchKeyCredentials",
    "BranchKeyError",
    "BranchKeySettings",
    "NotFoundError",
    "NotificationTimeout",
    "RequestRefusedError",
    "RunDetails",
    "RunNotStartedError",
    "RunStoppedError",
    "TransientError",
    "UnsafeFileIdError",
]
