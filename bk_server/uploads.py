"""Receiving an upload: the multipart body streamed to disk, hashed on the way, checked.

Nothing of the archive is held in memory beyond one network chunk; the integrity
headers of the 3.x clients are verified against the bytes actually written.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from prefect_branchkey.bk_server.errors import BadRequest, PayloadTooLarge
from prefect_branchkey.bk_server.multipart import MultipartError, MultipartParser, boundary_of, part_name

MAX_DATA_PART_BYTES = 1024 * 1024
# Body bytes handed to a worker thread at a time: disk writes, hashing and fsync stay off the event loop.
FEED_BYTES = 1024 * 1024


class _FileSink:
    """Writes a part to a file while hashing and counting it, refusing oversized bodies."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.size = 0
        self.sha256 = hashlib.sha256()
        self._limit = limit
        self._handle = open(path, "wb")  # noqa: SIM115 -- held across write() calls, closed by close()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._limit:
            raise PayloadTooLarge(f"upload is larger than the limit of {self._limit} bytes")
        self.sha256.update(data)
        self._handle.write(data)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


class _MemorySink:
    """Keeps a small form field (`data`) in memory, up to a limit."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.data = bytearray()
        self._limit = limit

    def write(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self._limit:
            raise BadRequest(f"form field {self.name!r} is larger than {self._limit} bytes")

    def close(self) -> None:
        pass


class _DiscardSink:
    """Drops a part nobody asked for (a duplicate or unnamed part)."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class ReceivedUpload:
    """The archive part on disk plus the form's `data` field, as the leaf sent them."""

    path: Path
    size: int
    digest: str
    metadata: str | None = None

    @property
    def digest_header_value(self) -> str:
        return "sha256=" + base64.b64encode(bytes.fromhex(self.digest)).decode()


async def receive_upload(
    content_type: str | None, body: AsyncIterator[bytes], incoming_dir: Path, max_bytes: int
) -> ReceivedUpload:
    """Parse a multipart upload into a file under `incoming_dir`; remove it on any failure."""
    try:
        boundary = boundary_of(content_type)
    except MultipartError as exc:
        raise BadRequest(str(exc)) from None
    target = incoming_dir / f"{uuid.uuid4()}.part"
    sinks: dict[str, _FileSink | _MemorySink] = {}

    def open_part(headers: dict[str, str]) -> _FileSink | _MemorySink | _DiscardSink:
        name, _filename = part_name(headers)
        if name in sinks or name is None:
            return _DiscardSink()
        sinks[name] = _FileSink(target, max_bytes) if name == "file" else _MemorySink(name, MAX_DATA_PART_BYTES)
        return sinks[name]

    parser = MultipartParser(boundary, open_part)
    try:
        pending = bytearray()
        async for chunk in body:
            pending += chunk
            if len(pending) >= FEED_BYTES:
                await anyio.to_thread.run_sync(parser.feed, bytes(pending))
                pending.clear()
        await anyio.to_thread.run_sync(parser.feed, bytes(pending))
        parser.close()
        file_sink = sinks.get("file")
        if not isinstance(file_sink, _FileSink):
            raise BadRequest("upload has no 'file' part")
        if file_sink.size == 0:
            raise BadRequest("the uploaded file is empty")
        received = ReceivedUpload(target, file_sink.size, file_sink.sha256.hexdigest())
        data = sinks.get("data")
        if isinstance(data, _MemorySink):
            _read_data_field(received, bytes(data.data))
        return received
    except MultipartError as exc:
        _discard(sinks, target)
        raise BadRequest(f"malformed multipart body: {exc}") from None
    except BaseException:
        _discard(sinks, target)
        raise


def _discard(sinks: dict[str, _FileSink | _MemorySink], target: Path) -> None:
    for sink in sinks.values():
        sink.close()
    target.unlink(missing_ok=True)


def _read_data_field(received: ReceivedUpload, raw: bytes) -> None:
    """Take the free-text `metadata` (JSON in 3.x, Python-looking text in 2.x) of the `data` field."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("form field 'data' must be a JSON object "
                         "like {\"leaf_name\": ..., \"metadata\": ...}") from None
    if not isinstance(data, dict):
        raise BadRequest("form field 'data' must be a JSON object")
    metadata = data.get("metadata")
    received.metadata = metadata if isinstance(metadata, str) or metadata is None else json.dumps(metadata)


def check_integrity(received: ReceivedUpload, size_header: str | None, digest_header: str | None) -> None:
    """Verify the 3.x `x-bk-file-size` / `x-bk-file-digest` headers when they are sent."""
    if size_header is not None:
        if not size_header.strip().isdigit():
            raise BadRequest(f"x-bk-file-size must be a number of bytes, got {size_header!r}")
        if int(size_header) != received.size:
            raise BadRequest(f"x-bk-file-size says {int(size_header)} bytes but {received.size} bytes arrived")
    if digest_header is not None:
        algorithm, _, value = digest_header.strip().partition("=")
        if algorithm.lower() != "sha256" or not value:
            raise BadRequest("x-bk-file-digest must be 'sha256=<base64 digest>'")
        if not hmac.compare_digest(value, received.digest_header_value.partition("=")[2]):
            raise BadRequest("x-bk-file-digest does not match the uploaded bytes (corrupted in transit?)")
