"""Every error prefect-branchkey raises, under one root, and the one place an HTTP reply becomes one.

    BranchKeyError
    ├── ConfigurationError (ValueError)      credentials or connection settings unusable
    ├── MissingExtraError (ImportError)      a feature whose extra is not installed
    ├── UsageError (ValueError)              an argument the protocol cannot carry
    ├── UnsafeFileIdError (ValueError)       a file id that is not a bare name
    ├── ArchiveError (ValueError)            not a valid update or aggregate archive
    │   ├── NotAnArchiveError, PickledArrayError, WeightingError, LayerError,
    │   ├── ArchiveTooLargeError, UnsupportedPayloadError
    │   └── AnalyticsError                   a federated_analytics archive or column that cannot be sent
    ├── CertificateError                     the platform's TLS certificate is not trusted: final
    ├── ProxyRefusedError                    the egress proxy refused the tunnel (403, 407): final
    ├── TransientError                       a retry may fix it: 5xx, timeouts, dropped connections
    │   └── NotificationTimeout
    ├── RequestRefusedError                  the platform said no (4xx): final
    │   ├── AuthenticationError              401 / 403
    │   ├── RunNotStartedError               409 `run_blocked`: the run is paused or stopped
    │   ├── ArchiveRejectedError             the update was refused (or would be)
    │   ├── NotFoundError                    404
    │   └── StaleRoundError (+ OutOfSyncError)  409 `stale_round`
    ├── OutOfSyncError                       the leaf's round is not the platform's: resync
    ├── RunStoppedError                      the run stopped while the leaf waited
    ├── AggregationTimeoutError              the bounded wait for the round's aggregate ran out
    ├── DiskFullError (OSError)              ENOSPC/EDQUOT writing or downloading a file: final, resumable
    └── defined where they are raised, in the layers above (tests/unit/test_error_tree.py
        keeps this list complete):
        flows.leaf.state             StateError, WorkDirError (ValueError), LeafBusyError (RuntimeError)
        flows.leaf.audit             AuditTrailError (ValueError), AuditTrailBrokenError  nothing is sent
        flows.participant            ParticipantError (ValueError)
        flows.adapters               ShapeMismatchError (ValueError)
        flows.updates.transforms     UpdateRefusedError            the update guard refused the update
        flows.updates.privacy        PrivacyPolicyError (ValueError)  the DP budget is spent
        flows.publishing.assets      AssetKeyError (ValueError)
        flows.federation             LeavesError, SamplingError, SimulationError (ValueError)
        flows.alerts                 AlertNotifyError (ValueError)
        deployments.edge             EdgeSetupError (ValueError)

Only `TransientError` is retried by the tasks. No message ever contains the session token.
`CertificateError` and `ProxyRefusedError` are not retried either, by the tasks or by the
notification listener: an untrusted certificate or a proxy's policy does not change within a
backoff, so the first request fails at once with one line naming the problem and the setting
that fixes it (`ca_bundle`, `proxy_url`).
`DiskFullError` is not retried: a full disk does not free itself in seconds, so the round fails at
once naming the file and the bytes; the leaf's state keeps its last step, and the next run resumes
there once space is freed.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os

from prefect_branchkey.bk_blocks.protocol import ERROR_CODE_RUN_BLOCKED, ERROR_CODE_STALE_ROUND, RUN_BLOCKED_TEXT

# Statuses a retry of the same request can get past (besides every 5xx).
TRANSIENT_STATUS = frozenset({408, 425, 429})


class BranchKeyError(Exception):
    """Root of every error prefect-branchkey raises."""


class ConfigurationError(BranchKeyError, ValueError):
    """The leaf's credentials or connection settings are incomplete or malformed: caught before any request."""


class MissingExtraError(BranchKeyError, ImportError):
    """A feature's optional dependencies are not installed: the one-line message names the extra
    that brings them (the base install is what a leaf needs; the rest are extras)."""

    def __init__(self, feature: str, extra: str, error: ImportError) -> None:
        missing = error.name or str(error)
        super().__init__(f"{feature} needs the {extra!r} extra ({missing} is not installed): "
                         f"pip install 'prefect-branchkey[{extra}]'", name=error.name)
        self.feature, self.extra, self.error = feature, extra, error

    def __reduce__(self) -> tuple[type[MissingExtraError], tuple[str, str, ImportError]]:
        """Rebuilt from its arguments when pickled (raised on a Dask worker, it reaches the flow whole)."""
        return type(self), (self.feature, self.extra, ModuleNotFoundError(str(self.error), name=self.error.name))


def require_extra(feature: str, extra: str, *modules: str) -> None:
    """Raise `MissingExtraError` naming `extra` unless every module is importable (found, not
    imported: a package's `__init__` checks its extra at no cost)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(feature, extra, ModuleNotFoundError(f"No module named {module!r}", name=module))


class UsageError(BranchKeyError, ValueError):
    """A call with an argument the protocol cannot carry: refused before any request."""


class UnsafeFileIdError(BranchKeyError, ValueError):
    """A file id that is not a bare name (a path separator or `..`): refused before any request."""


class ArchiveError(BranchKeyError, ValueError):
    """An archive that is not a valid BranchKey update or aggregate; the message says why."""


class NotAnArchiveError(ArchiveError):
    """The bytes are not a zip file of `.npy` members (not an `.npz`)."""


class PickledArrayError(ArchiveError):
    """A member holds a pickled or object array, which is never loaded."""


class WeightingError(ArchiveError):
    """`weighting` is missing, not a single value, or not finite and positive."""


class LayerError(ArchiveError):
    """Layers are missing, misnumbered, of an unsupported dtype, or hold NaN/infinity."""


class ArchiveTooLargeError(ArchiveError):
    """The archive would decompress to more bytes than the configured limit."""


class UnsupportedPayloadError(ArchiveError):
    """The archive declares a payload kind this code does not handle (yet)."""


class AnalyticsError(ArchiveError):
    """A statistics payload that cannot be written or sent: a bad column, field name, dtype or bundle;
    `field` names the field (or column) at fault when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CertificateError(BranchKeyError):
    """The TLS certificate the platform (or an inspecting proxy in front of it) presented is not
    trusted: an unknown CA, a host name it does not name, an expired certificate. Final: the fix is
    the Block's `ca_bundle` (or the certificate itself), never a retry. `reason` is OpenSSL's."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[CertificateError], tuple[str, str]]:
        """Rebuilt from its arguments when pickled (a Prefect state carries it whole)."""
        return type(self), (str(self), self.reason)


class ProxyRefusedError(BranchKeyError):
    """The egress proxy refused to open a tunnel to the platform: 407 (it wants credentials) or
    403 (its policy forbids that host or port). Final: the proxy's rules must change."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code

    def __reduce__(self) -> tuple[type[ProxyRefusedError], tuple[str, int | None]]:
        """Rebuilt from its arguments when pickled (a Prefect state carries it whole)."""
        return type(self), (str(self), self.status_code)


class TransientError(BranchKeyError):
    """A failure a retry may fix: a 5xx, a timeout, a refused or dropped connection."""


class NotificationTimeout(TransientError):
    """No matching notification arrived within the time allowed."""


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


class DiskFullError(BranchKeyError, OSError):
    """The disk (or the user's quota) filled up writing a file: ENOSPC or EDQUOT, or a file whose
    size is known to exceed the free space, refused before its first byte. The message names the
    file, the bytes it needs (when known) and the bytes free on its filesystem. Final, not
    transient: nothing of the file is left under its name, and the round resumes from its last
    saved step once space is freed. An `OSError` (`errno` ENOSPC or EDQUOT), so code that
    handles I/O errors handles it too."""

    def __init__(self, path: str | os.PathLike[str], needed_bytes: int | None, free_bytes: int | None,
                 error_number: int = errno.ENOSPC) -> None:
        self.path, self.needed_bytes, self.free_bytes = str(path), needed_bytes, free_bytes
        super().__init__(error_number, disk_full_message(self.path, needed_bytes, free_bytes, error_number), self.path)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[DiskFullError], tuple[str, int | None, int | None, int]]:
        """Rebuilt from its arguments when pickled (a Prefect state or a Dask worker carries it whole)."""
        return type(self), (self.path, self.needed_bytes, self.free_bytes, self.errno or errno.ENOSPC)


def disk_full_message(path: str, needed_bytes: int | None, free_bytes: int | None,
                      error_number: int = errno.ENOSPC) -> str:
    """What `DiskFullError` says: the file, the bytes it needs and those free, and how to go on."""
    quota = error_number == getattr(errno, "EDQUOT", None)
    need = f"it needs {byte_count(needed_bytes)}" if needed_bytes is not None else "it needs more room"
    if free_bytes is None:
        room = f"{need}; the free space of its filesystem could not be read"
    elif needed_bytes is None:
        room = f"it needs more than the {byte_count(free_bytes)} free on that filesystem"
    else:
        room = f"{need} and {byte_count(free_bytes)} are free on that filesystem"
    return (f"{'disk quota exceeded' if quota else 'disk full'} writing {path}: {room}"
            f"{' (the quota allows less)' if quota else ''}. No partial file was kept; free space there and run "
            "the round again: it resumes from its last saved step")


def byte_count(count: int) -> str:
    """A byte count exactly and in binary units, as in `67,109,120 bytes (64.0 MiB)`."""
    if abs(count) < 1024:
        return f"{count:,} bytes"
    units = ("KiB", "MiB", "GiB", "TiB")
    size, index = count / 1024, 0
    while abs(size) >= 1024 and index < len(units) - 1:
        size, index = size / 1024, index + 1
    return f"{count:,} bytes ({size:.1f} {units[index]})"


def error_for_response(status: int, body: bytes, reason: str, what: str) -> BranchKeyError:
    """The error a refused request raises: transient for 5xx and the retryable 4xx, else the
    refusal its status and error `code` name, with the platform's own message."""
    code = None
    try:
        data = json.loads(body)
        message = (data.get("error") or json.dumps(data)) if isinstance(data, dict) else str(data)
        code = data.get("code") if isinstance(data, dict) else None
    except ValueError:
        message = body[:300].decode(errors="replace") or reason
    text = f"{what} refused ({status}): {message}"
    if status in TRANSIENT_STATUS or status >= 500:
        return TransientError(text)
    if status in (401, 403):
        return AuthenticationError(text, status)
    if code == ERROR_CODE_STALE_ROUND:
        return StaleRoundError(text, status)
    if code == ERROR_CODE_RUN_BLOCKED or RUN_BLOCKED_TEXT in message:
        return RunNotStartedError(text, status_code=status)
    if status == 404:
        return NotFoundError(text, status)
    return RequestRefusedError(text, status)
