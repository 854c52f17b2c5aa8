"""The leaf-facing HTTP and WebSocket API, exactly as the BranchKey v1 protocol specifies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse

from prefect_branchkey.bk_blocks.analytics import AnalyticsInfo, inspect_analytics
from prefect_branchkey.bk_blocks.archive import (
    FEDERATED_ANALYTICS,
    ArchiveError,
    UpdateInfo,
    inspect_update,
)
from prefect_branchkey.bk_server.errors import BadRequest, PayloadTooLarge, PlatformError, UploadRejected
from prefect_branchkey.bk_server.platform import Platform, StagedUpload
from prefect_branchkey.bk_server.store import Leaf
from prefect_branchkey.bk_server.uploads import check_integrity, receive_upload

log = logging.getLogger(__name__)
router = APIRouter()
_WHOLE_NUMBER = re.compile(r"[0-9]{1,12}")


def platform_of(request: Request) -> Platform:
    return request.app.state.platform


def current_leaf(request: Request, authorization: Annotated[str | None, Header()] = None) -> Leaf:
    return platform_of(request).authenticate(authorization)


LeafDep = Annotated[Leaf, Depends(current_leaf)]


def created(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"data": data}, status_code=201)


@router.get("/healthz", include_in_schema=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/api/v1/run/{branch_id}")
def run_details(branch_id: str, request: Request, leaf: LeafDep) -> dict[str, Any]:
    platform = platform_of(request)
    return {"data": platform.run_view(platform.branch_for(leaf, branch_id))}


@router.post("/api/v1/file/upload", status_code=201)
async def upload(
    request: Request,
    leaf: LeafDep,
    x_bk_file_size: Annotated[str | None, Header()] = None,
    x_bk_file_digest: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
    x_bk_run_number: Annotated[str | None, Header()] = None,
    x_bk_round: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    platform = platform_of(request)
    settings = platform.settings
    expected = _expected_round(x_bk_run_number, x_bk_round)
    if idempotency_key is None:
        platform.check_round(platform.check_can_upload(leaf), expected)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
        raise PayloadTooLarge(f"upload of {length} bytes is larger than the limit of {settings.max_upload_bytes} bytes")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise BadRequest("Idempotency-Key must be 1 to 255 characters")
    received = await receive_upload(
        request.headers.get("content-type"), request.stream(), settings.incoming_dir, settings.max_upload_bytes
    )
    try:
        check_integrity(received, x_bk_file_size, x_bk_file_digest)
        earlier = platform.find_idempotent(leaf, idempotency_key, received.digest)
        if earlier is not None:
            received.path.unlink(missing_ok=True)
            return created(platform.receipt(earlier))
        info, analytics = await anyio.to_thread.run_sync(_inspect, received.path, settings.max_decompressed_bytes)
        staged = StagedUpload(received.path, received.size, received.digest, info, analytics)
        upload = await anyio.to_thread.run_sync(
            platform.accept_upload, leaf, staged, received.metadata, idempotency_key, expected
        )
    except BaseException:
        received.path.unlink(missing_ok=True)
        raise
    return created(platform.receipt(upload))


def _expected_round(run_number: str | None, round_number: str | None) -> tuple[int, int] | None:
    """The (run, round) an upload names with `x-bk-run-number` and `x-bk-round` (both or neither)."""
    if run_number is None and round_number is None:
        return None
    if run_number is None or round_number is None or not _WHOLE_NUMBER.fullmatch(run_number) \
            or not _WHOLE_NUMBER.fullmatch(round_number):
        raise BadRequest("x-bk-run-number and x-bk-round go together, as whole numbers")
    return int(run_number), int(round_number)


def _inspect(path: Path, max_decompressed_bytes: int) -> tuple[UpdateInfo, AnalyticsInfo | None]:
    """Validate a received archive (a model update, or a statistics payload and its fields); an
    invalid one becomes a 422 naming the problem."""
    try:
        info = inspect_update(path, max_decompressed_bytes=max_decompressed_bytes)
        analytics = inspect_analytics(path) if info.kind == FEDERATED_ANALYTICS else None
    except ArchiveError as exc:
        raise UploadRejected(f"archive rejected: {exc}") from None
    return info, analytics


@router.get("/api/v1/file/download/{file_id}")
def download_link(file_id: str, request: Request, leaf: LeafDep) -> dict[str, Any]:
    platform = platform_of(request)
    platform.aggregate_for(leaf, file_id)
    query = platform.downloads.sign(file_id, leaf.branch_id)
    base = platform.settings.public_url or str(request.base_url).rstrip("/")
    url = f"{base}/api/v1/files/{file_id}?" + "&".join(f"{k}={v}" for k, v in query.items())
    return {"data": {"download_url": url}}


@router.get("/api/v1/files/{file_id}")
def presigned_download(file_id: str, request: Request, branch_id: str = "", expires: str = "",
                       signature: str = "") -> FileResponse:
    path = platform_of(request).verify_download(file_id, branch_id, expires, signature)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{file_id}.npz")


@router.post("/api/v1/performance/analysis", status_code=201)
async def performance_analysis(request: Request, leaf: LeafDep,
                               idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("metrics body must be JSON text") from None
    await anyio.to_thread.run_sync(platform_of(request).record_metrics, leaf, body, idempotency_key)
    return created({"status": "stored"})


@router.get("/api/v1/config/branch/{branch_id}")
def branch_config(branch_id: str, request: Request, leaf: LeafDep) -> dict[str, Any]:
    platform = platform_of(request)
    return {"data": platform.branch_config(platform.branch_for(leaf, branch_id))}


@router.post("/api/v1/ws/ticket")
def ws_ticket(request: Request, leaf: LeafDep) -> dict[str, Any]:
    return {"data": platform_of(request).tickets.issue(leaf.id)}


@router.websocket("/api/v1/ws")
async def notifications(websocket: WebSocket, ticket: str = "", request_id: str = "") -> None:
    platform: Platform = websocket.app.state.platform
    try:
        leaf = platform.redeem_ticket(ticket, request_id)
    except PlatformError as exc:
        log.info("WebSocket refused: %s", exc.message)
        await websocket.close(code=1008, reason=exc.message)
        return
    await websocket.accept()
    hub = platform.notifier.hub
    queue = hub.register(leaf.id)
    log.info("WebSocket open for leaf %s", leaf.name)
    try:
        await _pump(websocket, queue)
    finally:
        hub.unregister(leaf.id, queue)
        log.info("WebSocket closed for leaf %s", leaf.name)


async def _pump(websocket: WebSocket, queue: asyncio.Queue[str]) -> None:
    """Send queued notifications until the client goes away (its frames are read and dropped)."""

    async def send() -> None:
        while True:
            await websocket.send_text(await queue.get())

    async def receive() -> None:
        while True:
            await websocket.receive_text()

    tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await task
