"""A streaming multipart/form-data parser: parts are handed to sinks as bytes arrive.

Starlette's form parsing needs an extra package and spools files through a temporary
copy; an upload of a model must go straight to its place on disk, hashed on the way,
never held whole in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

MAX_HEADER_BYTES = 16 * 1024
MAX_PREAMBLE_BYTES = 64 * 1024
_PARAM = re.compile(r';\s*([a-zA-Z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_BOUNDARY = re.compile(r'boundary\s*=\s*("(?:[^"\\]|\\.)+"|[^;\s]+)', re.IGNORECASE)


class MultipartError(ValueError):
    """The request body is not well-formed multipart/form-data."""


class PartSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, or a MultipartError."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("upload must be multipart/form-data")
    match = _BOUNDARY.search(content_type)
    if not match:
        raise MultipartError("multipart/form-data without a boundary")
    return match.group(1).strip('"').encode("latin-1")


def part_name(headers: dict[str, str]) -> tuple[str | None, str | None]:
    """The `name` and `filename` parameters of a part's Content-Disposition."""
    disposition = headers.get("content-disposition", "")
    params = {key.lower(): value.strip().strip('"') for key, value in _PARAM.findall(disposition)}
    return params.get("name"), params.get("filename")


class MultipartParser:
    """Feed body chunks in; each part's bytes go to the sink `open_part(headers)` returns."""

    def __init__(self, boundary: bytes, open_part: Callable[[dict[str, str]], PartSink]) -> None:
        self._open_part = open_part
        self._dash_boundary = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray()
        self._state = "preamble"
        self._sink: PartSink | None = None

    @property
    def finished(self) -> bool:
        return self._state == "end"

    def feed(self, data: bytes) -> None:
        if self._state == "end":
            return
        self._buffer += data
        while self._step():
            pass

    def close(self) -> None:
        """Call at the end of the body: a body without its closing boundary is an error."""
        if self._state != "end":
            raise MultipartError("multipart body ended before its closing boundary")

    def _step(self) -> bool:
        """Advance the state machine once; False when more bytes are needed."""
        buffer = self._buffer
        if self._state == "preamble":
            index = buffer.find(self._dash_boundary, 0, MAX_PREAMBLE_BYTES + len(self._dash_boundary))
            if index < 0:
                if len(buffer) > MAX_PREAMBLE_BYTES:
                    raise MultipartError("no multipart boundary found in the body")
                return False
            del buffer[: index + len(self._dash_boundary)]
            self._state = "after_boundary"
            return True
        if self._state == "after_boundary":
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = "end"
                buffer.clear()
                return False
            if buffer[:2] != b"\r\n":
                raise MultipartError("malformed multipart boundary line")
            del buffer[:2]
            self._state = "headers"
            return True
        if self._state == "headers":
            index = buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
            if index < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise MultipartError("multipart part headers too long")
                return False
            headers = self._parse_headers(bytes(buffer[:index]))
            del buffer[: index + 4]
            self._sink = self._open_part(headers)
            self._state = "body"
            return True
        return self._step_body()

    def _step_body(self) -> bool:
        buffer = self._buffer
        assert self._sink is not None
        index = buffer.find(self._delimiter)
        if index >= 0:
            self._sink.write(bytes(buffer[:index]))
            self._sink.close()
            self._sink = None
            del buffer[: index + len(self._delimiter)]
            self._state = "after_boundary"
            return True
        safe = len(buffer) - (len(self._delimiter) - 1)
        if safe > 0:
            self._sink.write(bytes(buffer[:safe]))
            del buffer[:safe]
        return False

    @staticmethod
    def _parse_headers(raw: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        for line in raw.decode("utf-8", errors="replace").split("\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise MultipartError(f"malformed multipart header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        return headers
