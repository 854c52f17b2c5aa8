"""How to talk to BranchKey, in three layers that each import only those above them here:

- the protocol and the `.npz` archive format (`protocol`, `archive`, `errors`, `files`): plain Python and numpy;
- the client (`client`, `notifications`, `compat`): HTTP plus AMQP or WebSocket notices, built
  from plain values; it needs requests, pika and websockets, never Prefect;
- the Prefect side (`credentials`, the `BranchKeyCredentials` Block, and `settings`, the same
  fields from `BRANCHKEY_*` variables): imported only when asked for, so that `import
  prefect_branchkey.bk_blocks.client` works where Prefect is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect_branchkey.bk_blocks.client import (
    AggregationRef,
    BranchKeyClient,
    ConnectionOptions,
    LeafIdentity,
    RunDetails,
    UploadReply,
)
from prefect_branchkey.bk_blocks.errors import (
    AggregationTimeoutError,
    AnalyticsError,
    ArchiveError,
    ArchiveRejectedError,
    AuthenticationError,
    BranchKeyError,
    CertificateError,
    ConfigurationError,
    DiskFullError,
    NotFoundError,
    NotificationTimeout,
    OutOfSyncError,
    ProxyRefusedError,
    RequestRefusedError,
    RunNotStartedError,
    RunStoppedError,
    StaleRoundError,
    TransientError,
    UnsafeFileIdError,
    UsageError,
)
from prefect_branchkey.bk_blocks.notifications import AggregationNotice

if TYPE_CHECKING:
    from prefect_branchkey.bk_blocks.credentials import BranchKeyCredentials
    from prefect_branchkey.bk_blocks.settings import BranchKeySettings

_PREFECT_SIDE = {"BranchKeyCredentials": "credentials", "BranchKeySettings": "settings"}


def __getattr__(name: str) -> Any:
    """The Block and the settings, imported (with Prefect) on first use."""
    if name in _PREFECT_SIDE:
        from importlib import import_module

        return getattr(import_module(f".{_PREFECT_SIDE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AggregationNotice",
    "AggregationRef",
    "AggregationTimeoutError",
    "AnalyticsError",
    "ArchiveError",
    "ArchiveRejectedError",
    "AuthenticationError",
    "BranchKeyClient",
    "BranchKeyCredentials",
    "BranchKeyError",
    "BranchKeySettings",
    "CertificateError",
    "ConfigurationError",
    "ConnectionOptions",
    "DiskFullError",
    "LeafIdentity",
    "NotFoundError",
    "NotificationTimeout",
    "OutOfSyncError",
    "ProxyRefusedError",
    "RequestRefusedError",
    "RunDetails",
    "RunNotStartedError",
    "RunStoppedError",
    "StaleRoundError",
    "TransientError",
    "UnsafeFileIdError",
    "UploadReply",
    "UsageError",
]
