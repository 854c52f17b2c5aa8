"""Refusals the platform answers with: each carries its HTTP status and a message that
names the problem, sent as `{"error": "..."}`."""

from __future__ import annotations

from prefect_branchkey.bk_blocks.protocol import ERROR_CODE_RUN_BLOCKED, ERROR_CODE_STALE_ROUND


class PlatformError(Exception):
    """A request the platform refuses; `status_code` is what the client sees."""

    status_code = 400
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(PlatformError):
    status_code = 400


class Unauthorized(PlatformError):
    status_code = 401


class Forbidden(PlatformError):
    status_code = 403


class NotFound(PlatformError):
    status_code = 404


class RunBlocked(PlatformError):
    """Uploads are only taken while the branch's run is `start`."""

    status_code = 409
    code = ERROR_CODE_RUN_BLOCKED


class StaleRound(PlatformError):
    """An upload meant for a round that has closed (an extension: only when the leaf names the
    round with `x-bk-run-number` / `x-bk-round`); `code` lets the client tell it apart."""

    status_code = 409
    code = ERROR_CODE_STALE_ROUND


class Gone(PlatformError):
    status_code = 410


class PayloadTooLarge(PlatformError):
    status_code = 413


class UploadRejected(PlatformError):
    """The archive is well-formed HTTP but not an acceptable update for this round."""

    status_code = 422
