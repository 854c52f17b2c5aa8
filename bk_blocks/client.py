"""`BranchKeyClient`: the leaf side of the BranchKey v1 protocol, over one pooled session.

Uploads stream from disk (the body is never held in memory) with the 3.x integrity
headers; downloads stream to a temporary file that is renamed into place only when
complete; every failure is a typed error saying whether a retry can help.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import io
import json
import logging
import math
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import numpy as np
import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefect_branchkey.bk_blocks.analytics import inspect_analytics, write_statistics
from prefect_branchkey.bk_blocks.archive import FEDERATED_ANALYTICS, inspect_aggregate, inspect_update, write_update
from prefect_branchkey.bk_blocks.errors import (
    ArchiveError,
    ArchiveRejectedError,
    AuthenticationError,
    BranchKeyError,
    ConfigurationError,
    NotFoundError,
    RequestRefusedError,
    RunNotStartedError,
    StaleRoundError,
    TransientError,
    UnsafeFileIdError,
    UsageError,
    error_for_response,
)
from prefect_branchkey.bk_blocks.files import atomic_write, sha256_file
from prefect_branchkey.bk_blocks.network import Egress, check_ca_bundle, check_proxy_url, origin
from prefect_branchkey.bk_blocks.notifications import (
    AggregationNotice,
    AmqpListener,
    NotificationListener,
    WebSocketListener,
    ticket_fetcher,
)
from prefect_branchkey.bk_blocks.progress import TransferProgress
from prefect_branchkey.bk_blocks.protocol import METRIC_MODES, MetricsMode

log = logging.getLogger(__name__)

_SAFE_FILE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_STREAM_BLOCK = 1024 * 1024
# An upload's body is sent in blocks of this size: few enough calls a GB (4,000) to cost nothing,
# small enough (under 1 % of the smallest transfer logged by tenths) that each tenth's line says its tenth.
_UPLOAD_BLOCK = 256 * 1024
# A download's bytes are handed to the disk every this many, as they arrive (see `_start_writeback`).
_WRITEBACK_BYTES = 32 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's `sync_file_range` from the C library, or None where there is none (macOS)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _start_writeback(handle: IO[bytes], start: int, end: int) -> int:
    """Start writing bytes `start` to `end` of `handle` to disk, without waiting for them; return `end`.

    A download is fsynced before it takes its name (`atomic_write`). Left to the kernel, most of a
    large file is still only in memory when the last byte arrives, so that fsync then writes all of
    it after the transfer (0.38-0.43 s a GB in bench/transfer_rate.py). Handing each 32 MiB to the
    disk as it arrives overlaps the writing with the transfer: the fsync finds little left. Advisory
    only (`SYNC_FILE_RANGE_WRITE`: no wait, no flush of the disk's cache): a failure shows in the
    fsync, and where the call does not exist nothing changes.
    """
    sync_file_range = _sync_file_range()
    if sync_file_range is not None:
        handle.flush()
        sync_file_range(handle.fileno(), start, end - start, _SYNC_FILE_RANGE_WRITE)
    return end


def _client_version() -> str:
    try:
        return version("prefect-branchkey")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class LeafIdentity:
    """Who the leaf is on the platform: the identity half of the platform's credentials JSON
    (the session token is passed to the client on its own, so it is never part of a repr)."""

    leaf_id: str
    leaf_name: str
    tree_id: str
    branch_id: str
    owner_id: str = ""


def check_host(host: str) -> str:
    """The platform's base URL without a trailing slash; anything but an http(s) URL is refused."""
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"host must be an http(s) URL like https://app.branchkey.com, got {host!r}")
    return host.rstrip("/")


PLATFORM_JSON_KEYS = ("id", "name", "session_token", "tree_id", "branch_id", "owner_id")


def read_platform_credentials(source: str | os.PathLike[str] | dict[str, Any]) -> tuple[LeafIdentity, str]:
    """The leaf's identity and session token from the credentials JSON the platform issues
    (a path or the parsed dict), refusing one that lacks a field."""
    data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    missing = [key for key in PLATFORM_JSON_KEYS if not data.get(key)]
    if missing:
        raise ConfigurationError(f"credentials JSON is missing {', '.join(missing)}")
    identity = LeafIdentity(leaf_id=data["id"], leaf_name=data["name"], tree_id=data["tree_id"],
                            branch_id=data["branch_id"], owner_id=data["owner_id"])
    return identity, str(data["session_token"])


class ConnectionOptions(BaseModel):
    """How to reach the platform: its API, TLS trust, the egress proxy, timeouts, and the
    notification transport. (`BranchKeySettings` reads the same fields from `BRANCHKEY_*` variables.)

    `ca_bundle` and `proxy_url` hold for every transport (HTTP, WebSocket, AMQP); what each does
    with them is `bk_blocks/network.py`'s docstring. Both are optional, so a Block saved before
    they existed loads unchanged. `proxies` is the older, HTTP-only proxy setting: still honoured
    for HTTP requests, deprecated, and refused together with `proxy_url`.
    """

    model_config = ConfigDict(frozen=True)

    host: str = Field(default="https://app.branchkey.com", description="Base URL of the BranchKey platform API.")
    verify_tls: bool = Field(default=True, description="Verify the platform's TLS certificates (leave on).")
    ca_bundle: str | None = Field(
        default=None, title="CA bundle",
        description="CA certificates the platform's TLS is verified with, instead of the default ones (behind a "
                    "TLS-inspecting proxy: the proxy's CA), for HTTP, WebSocket and AMQP: a path to a PEM file on "
                    "the machine that runs the leaf, or the PEM text itself (told apart by its '-----BEGIN' start). "
                    "Not a secret field: certificates only, never a private key.")
    proxy_url: str | None = Field(
        default=None, title="Proxy URL",
        description="An http:// proxy that tunnels with CONNECT, e.g. http://proxy.example.org:3128, used for every "
                    "connection to the platform (HTTP, WebSocket, AMQP). Unset: HTTP and WebSocket follow "
                    "HTTPS_PROXY/NO_PROXY of the environment and AMQP connects directly. No credentials in it.")
    proxies: dict[str, str] | None = Field(
        default=None,
        description="Deprecated, use proxy_url: proxies for HTTP requests only, as for `requests` "
                    "({'https': 'http://proxy:8080'}); notifications do not use them.")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Seconds to wait for a connection to open.")
    read_timeout_s: float = Field(default=120.0, gt=0, description="Seconds to wait for data on an open connection.")
    notification_transport: Literal["amqp", "websocket"] = Field(
        default="websocket",
        description="How aggregation notices arrive: 'websocket' (3.x clients) or 'amqp' (RabbitMQ, 2.x clients).")
    amqp_host: str | None = Field(
        default=None, description="RabbitMQ host; by default the API's host name (without its port).")
    amqp_port: int = Field(default=5672, ge=1, le=65535, description="RabbitMQ port.")
    amqp_tls: bool = Field(default=False, description="Connect to RabbitMQ over TLS (AMQPS).")
    keepalive_s: float = Field(
        default=20.0, ge=1, le=600,
        description="Seconds between keepalives on the notification connection (AMQP heartbeat, WebSocket ping); "
                    "a dead connection is noticed and reconnected within about twice this.")

    @field_validator("host")
    @classmethod
    def _host_is_a_url(cls, value: str) -> str:
        return check_host(value)

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_is_a_path_or_pem(cls, value: str | None) -> str | None:
        return check_ca_bundle(value)

    @field_validator("proxy_url")
    @classmethod
    def _proxy_url_is_an_http_proxy(cls, value: str | None) -> str | None:
        return check_proxy_url(value)

    @model_validator(mode="after")
    def _settings_agree(self) -> ConnectionOptions:
        if self.proxy_url and self.proxies:
            raise ValueError("give proxy_url or the older proxies, not both (proxy_url covers HTTP and notifications)")
        if self.ca_bundle and not self.verify_tls:
            raise ValueError("ca_bundle is given but verify_tls is off, so it would never be used: turn verify_tls on")
        if self.proxy_url and not self.host.startswith("https://"):
            raise ValueError("proxy_url with an http:// host would send the session token to the proxy in clear: "
                             "use the platform's https:// address")
        if self.proxy_url and self.notification_transport == "amqp" and not self.amqp_tls:
            raise ValueError("proxy_url with AMQP but amqp_tls off would send the session token through the proxy "
                             "in clear: turn amqp_tls on (AMQPS, usually port 5671) or use the websocket transport")
        return self

    @property
    def amqp_hostname(self) -> str:
        """The RabbitMQ host: the override, else the API's host name."""
        return self.amqp_host or urlsplit(self.host).hostname or "localhost"

    @property
    def ws_base(self) -> str:
        """The WebSocket base URL of the API (`ws://` or `wss://`)."""
        scheme, rest = self.host.split(":", 1)
        return ("wss" if scheme == "https" else "ws") + ":" + rest


@dataclass(frozen=True)
class AggregationRef:
    """An aggregation and the (run, round) it closed."""

    aggregation_id: str
    run_number: int
    round: int

    @classmethod
    def parse(cls, value: Any) -> AggregationRef | None:
        """From a reply's `latest_aggregation` field; None when absent or not in that shape."""
        try:
            return cls(str(value["aggregation_id"]), int(value["run_number"]), int(value["round"]))
        except (TypeError, KeyError, ValueError):
            return None


@dataclass(frozen=True)
class RunDetails:
    """The branch's run: `start`, `pause` or `stop`, and its number.

    `round`, `aggregating` and `latest_aggregation` are extra fields a platform may add
    (bk_server does; None and empty when it does not): the open round, the run's rounds being
    aggregated now, and the branch's most recent aggregation. They let a leaf that missed a
    notice or was restored from an old state find the federation.
    """

    run_status: str
    run_number: int
    round: int | None = None
    latest_aggregation: AggregationRef | None = None
    aggregating: tuple[int, ...] = ()
    latest_statistics: AggregationRef | None = None

    @property
    def tells_round(self) -> bool:
        """Whether the platform said which round is open (so a leaf can check it is in step)."""
        return self.round is not None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> RunDetails:
        round_number, aggregating = data.get("round"), data.get("aggregating")
        return cls(str(data["run_status"]), int(data["run_number"]),
                   round_number if isinstance(round_number, int) and round_number >= 0 else None,
                   AggregationRef.parse(data.get("latest_aggregation")),
                   tuple(n for n in aggregating if isinstance(n, int)) if isinstance(aggregating, list) else (),
                   AggregationRef.parse(data.get("latest_statistics")))


@dataclass(frozen=True)
class UploadReply:
    """An accepted upload: its file id and, when the platform says so (extra fields), the run and
    round it counts in and that round's aggregation if it already happened (a replayed upload, or
    the upload that completed the round when the platform aggregated before answering)."""

    file_id: str
    run_number: int | None = None
    round: int | None = None
    aggregation_id: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any]) -> UploadReply:
        def number(key: str) -> int | None:
            value = data.get(key)
            return value if isinstance(value, int) else None

        aggregation_id = data.get("aggregation_id")
        return cls(str(data["file_id"]), number("run_number"), number("round"),
                   aggregation_id if isinstance(aggregation_id, str) else None)


def check_file_id(file_id: str) -> str:
    """A file id usable as a path component: a bare name, no separators, no `..`."""
    if not isinstance(file_id, str) or not _SAFE_FILE_ID.match(file_id) or ".." in file_id:
        raise UnsafeFileIdError(f"refusing unsafe file id {file_id!r}: it must be a bare name")
    return file_id


def digest_header(sha256: bytes) -> str:
    """The 3.x `x-bk-file-digest` value: `sha256=<base64 of the raw digest>`."""
    return "sha256=" + base64.b64encode(sha256).decode()


class _MultipartBody:
    """A multipart/form-data body read from disk as it is sent, with a known length.

    Deliberately not an `io` object: `requests` would call `tell()` on one, fail, and fall
    back to chunked encoding instead of sending this body's Content-Length. Iterated, in blocks
    of 256 KiB, rather than read: http.client reads a body that has `read()` 16 KiB at a time
    (urllib3's blocksize), 61,000 reads, progress counts and sends a GB.
    """

    def __init__(self, path: Path, fields: dict[str, str], progress: TransferProgress | None = None) -> None:
        self.boundary = uuid.uuid4().hex
        self._progress = progress
        head = "".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in fields.items()
        )
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n")
        self._parts: list[io.BufferedIOBase | io.BytesIO] = [
            io.BytesIO(head.encode()),
            open(path, "rb"),  # noqa: SIM115 -- read and closed part by part as the body streams (see __iter__/close)
            io.BytesIO(f"\r\n--{self.boundary}--\r\n".encode()),
        ]
        self._length = len(head.encode()) + path.stat().st_size + len(f"\r\n--{self.boundary}--\r\n")

    def __len__(self) -> int:
        return self._length

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __iter__(self) -> Iterator[bytes]:
        while self._parts:
            data = self._parts[0].read(_UPLOAD_BLOCK)
            if not data:
                self._parts.pop(0).close()
                continue
            if self._progress is not None:
                self._progress.add(len(data))
            yield data

    def close(self) -> None:
        for part in self._parts:
            part.close()
        self._parts = []


class BranchKeyClient:
    """The leaf's connection to the platform: HTTP calls plus one notification listener."""

    def __init__(self, leaf: LeafIdentity, session_token: str, options: ConnectionOptions | None = None, *,
                 logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self.leaf = leaf
        self.options = options or ConnectionOptions()
        self.log = logger or log
        self._token = session_token
        self._egress = Egress(ca_bundle=self.options.ca_bundle, verify_tls=self.options.verify_tls,
                              proxy_url=self.options.proxy_url, proxies=self.options.proxies)
        if self.options.proxies:
            self.log.warning("`proxies` is deprecated and used for HTTP requests only; set proxy_url instead so "
                             "that notifications go through the proxy too")
        self._session = requests.Session()
        self._session.headers.clear()
        self._timeout = (self.options.connect_timeout_s, self.options.read_timeout_s)
        self._listener: NotificationListener | None = None
        self._listener_lock = threading.Lock()
        self._ticket_session = requests.Session()
        self._run: RunDetails | None = None
        self._run_status_notices = 0

    def __repr__(self) -> str:
        return (f"BranchKeyClient(leaf={self.leaf.leaf_name!r}, branch_id={self.leaf.branch_id!r}, "
                f"host={self.options.host!r})")

    def __enter__(self) -> BranchKeyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the notification listener and release pooled connections."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._session.close()
        self._ticket_session.close()
        self._egress.close()

    # -- HTTP plumbing -----------------------------------------------------------------

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.leaf.leaf_id}:{self._token}",
                "accept": accept, "LEAF": "true"}

    def _request(self, method: str, path: str, *, expected: int, what: str, **kwargs: Any) -> requests.Response:
        url = self.options.host + path
        kwargs.setdefault("headers", self._headers())
        try:
            response = self._session.request(method, url, timeout=self._timeout, verify=self._egress.requests_verify,
                                             proxies=self._egress.requests_proxies, **kwargs)
        except requests.RequestException as exc:
            raise self._connection_error(exc, what, self.options.host) from None
        if response.status_code != expected:
            raise self._error(response, what)
        return response

    def _connection_error(self, exc: requests.RequestException, what: str, url: str) -> BranchKeyError:
        """What a request that got no reply raises: `CertificateError` or `ProxyRefusedError`
        (final, one line), else a `TransientError` naming the failure and where."""
        final = self._egress.final_error(exc, url)
        if final is not None:
            return final
        via = f" through proxy {self.options.proxy_url}" if self.options.proxy_url else ""
        return TransientError(f"{what} failed: {type(exc).__name__} talking to {origin(url)}{via}")

    @staticmethod
    def _error(response: requests.Response, what: str) -> BranchKeyError:
        return error_for_response(response.status_code, response.content, response.reason or "", what)

    # -- the protocol's calls ----------------------------------------------------------

    def run_details(self) -> RunDetails:
        """The branch's run status and number, fetched now."""
        response = self._request("GET", f"/api/v1/run/{self.leaf.branch_id}", expected=200, what="run details")
        self._run = RunDetails.parse(response.json()["data"])
        if self._listener is not None:
            self._listener.run_status = self._run.run_status
        return self._run

    @property
    def run_status(self) -> str:
        """The run status, kept current by `run_status` notices once listening."""
        if self._listener is not None and self._listener.run_status is not None:
            return self._listener.run_status
        return (self._run or self.run_details()).run_status

    @property
    def run_number(self) -> int:
        """The run number, refetched after a `start` notice (which may begin a new run)."""
        return (self._run or self.run_details()).run_number

    def branch_config(self) -> dict[str, Any]:
        """The branch's configuration (3.x call)."""
        response = self._request("GET", f"/api/v1/config/branch/{self.leaf.branch_id}", expected=200,
                                 what="branch config")
        return response.json()["data"]

    def branch_name(self) -> str | None:
        """The branch's name from its configuration (3.x call); None when the platform gives none."""
        config = self.branch_config()
        branch = config.get("branch") if isinstance(config, dict) else None
        name = branch.get("name") if isinstance(branch, dict) else None
        return name.strip() or None if isinstance(name, str) else None

    def write_update(self, path: str | os.PathLike[str], weighting: float, layers: Sequence[np.ndarray],
                     *, compress: bool = False) -> Path:
        """Write an update archive (uncompressed unless asked: compression saves little on weights)."""
        try:
            return write_update(path, weighting, layers, compress=compress)
        except ArchiveError as exc:
            raise ArchiveRejectedError(f"cannot write update: {exc}") from None

    def upload(self, path: str | os.PathLike[str], idempotency_key: str | None = None,
               metadata: dict[str, Any] | None = None, sha256: bytes | None = None) -> str:
        """Validate an update archive, then stream it to the platform; return its file id.

        With an `idempotency_key`, a retried upload of the same archive returns the same
        file id and counts once. Pass `sha256` if the caller already hashed the file.
        """
        return self.upload_update(path, idempotency_key=idempotency_key, metadata=metadata, sha256=sha256).file_id

    def upload_update(self, path: str | os.PathLike[str], *, idempotency_key: str | None = None,
                      metadata: dict[str, Any] | None = None, sha256: bytes | None = None,
                      for_round: tuple[int, int] | None = None) -> UploadReply:
        """`upload()`, returning the whole reply. With `for_round=(run, round)`, the round the
        update was trained for is sent along (`x-bk-run-number`, `x-bk-round`): a platform that
        knows them refuses the update once that round has closed (`StaleRoundError`) instead of
        counting it in a later round; one that does not ignores them."""
        path = Path(path)
        try:
            info = inspect_update(path)
            if info.kind == FEDERATED_ANALYTICS:
                inspect_analytics(path)
        except ArchiveError as exc:
            raise ArchiveRejectedError(f"{path.name} is not a valid update: {exc}") from None
        except OSError as exc:
            raise ArchiveRejectedError(f"cannot read {path}: {exc.strerror}") from None
        size, digest = path.stat().st_size, digest_header(sha256 or sha256_file(path))
        meta = {"client_version": f"prefect-branchkey/{_client_version()}", "file_size": size,
                "file_digest": digest, "kind": info.kind, **(metadata or {})}
        body = _MultipartBody(path, {"data": json.dumps({"leaf_name": self.leaf.leaf_name,
                                                         "metadata": json.dumps(meta)})},
                              TransferProgress(self.log, f"upload of {path.name}", size))
        headers = self._headers() | {"Content-Type": body.content_type, "x-bk-file-size": str(size),
                                     "x-bk-file-digest": digest}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if for_round is not None:
            headers |= {"x-bk-run-number": str(for_round[0]), "x-bk-round": str(for_round[1])}
        try:
            response = self._request("POST", "/api/v1/file/upload", expected=201, what="upload",
                                     headers=headers, data=body)
        except RequestRefusedError as exc:
            if isinstance(exc, (AuthenticationError, RunNotStartedError, NotFoundError, StaleRoundError)):
                raise
            raise ArchiveRejectedError(str(exc), exc.status_code) from None
        finally:
            body.close()
        reply = UploadReply.parse(response.json()["data"])
        self.log.info("uploaded %s (%d bytes, weighting %g) as %s", path.name, size, info.weighting, reply.file_id)
        return reply

    def write_statistics(self, path: str | os.PathLike[str], columns: dict[str, Any], nan_policy: str = "omit",
                         fields: dict[str, Any] | None = None) -> Path:
        """Reduce raw columns to their six-value bundles (plus pre-reduced `fields`) into an analytics
        archive, as the official `save_analytics` does; no raw value is written."""
        try:
            return write_statistics(path, columns, nan_policy, fields)
        except ArchiveError as exc:
            raise ArchiveRejectedError(f"cannot write statistics: {exc}") from None

    def download(self, file_id: str, dest_dir: str | os.PathLike[str]) -> Path:
        """Download an aggregate to `dest_dir/<file_id>.npz`, atomically: never a partial file."""
        return self._download(file_id, dest_dir, inspect_aggregate, "aggregate")

    def download_statistics(self, file_id: str, dest_dir: str | os.PathLike[str]) -> Path:
        """Download a combined statistics result to `dest_dir/<file_id>.npz`, atomically."""
        return self._download(file_id, dest_dir, lambda path: inspect_analytics(path, combined=True),
                              "combined statistics")

    def _download(self, file_id: str, dest_dir: str | os.PathLike[str], check: Any, what: str) -> Path:
        """Fetch a platform file by id into `dest_dir`, checked by `check` before it takes its name."""
        check_file_id(file_id)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        response = self._request("GET", f"/api/v1/file/download/{file_id}", expected=200, what="download link",
                                 headers=self._headers(accept="*/*"))
        url = response.json()["data"]["download_url"]
        target = dest_dir / f"{file_id}.npz"
        try:
            received = self._fetch(url, target, check, f"download of {what} {file_id}")
        except ArchiveError as exc:
            raise TransientError(f"downloaded {what} {file_id} is damaged ({exc}); download it again") from None
        self.log.info("downloaded %s %s (%d bytes)", what, file_id, received)
        return target

    def _fetch(self, url: str, target: Path, check: Any, what: str) -> int:
        """Step two of a download: the pre-signed URL, with no auth headers, streamed into `target`
        through `atomic_write` and checked by `check` before it takes its name. The reply's
        Content-Length sizes the write, so a file the disk cannot hold fails at once with
        `DiskFullError` (as does a disk that fills up midway), never as a transient error."""
        where = urlsplit(url)._replace(query="").geturl()
        try:
            with self._session.get(url, stream=True, timeout=self._timeout, verify=self._egress.requests_verify,
                                   proxies=self._egress.requests_proxies) as response:
                if response.status_code != 200:
                    raise self._error(response, f"download from {where}")
                expected = int(response.headers.get("Content-Length", "-1"))
                with atomic_write(target, size=expected if expected >= 0 else None) as handle:
                    received = self._receive(response, handle, expected, what)
                    handle.flush()
                    check(handle.name)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            final = self._egress.final_error(exc, url)
            if final is not None:
                raise final from None
            raise TransientError(f"download interrupted: {type(exc).__name__}") from None
        return received

    def _receive(self, response: requests.Response, handle: IO[bytes], expected: int, what: str) -> int:
        """Copy a download's body to `handle`, block by block, handing it to the disk as it arrives
        (`_start_writeback`); a body empty or shorter than `expected` (when not -1) is transient."""
        progress = TransferProgress(self.log, what, expected if expected >= 0 else None)
        received = written_back = 0
        for block in response.iter_content(chunk_size=_STREAM_BLOCK):
            handle.write(block)
            received += len(block)
            progress.add(len(block))
            if received - written_back >= _WRITEBACK_BYTES:
                written_back = _start_writeback(handle, written_back, received)
        if received == 0:
            raise TransientError("download returned an empty body")
        if expected >= 0 and received != expected:
            raise TransientError(f"download ended after {received} of {expected} bytes")
        return received

    def send_metrics(self, aggregation_id: str, metrics: dict[str, Any], mode: MetricsMode = "test",
                     idempotency_key: str | None = None) -> None:
        """Report metrics for an aggregation, as the official clients do (JSON text, no Content-Type).

        With an `idempotency_key` (a header platforms without it ignore), a resend after a crash
        between the request and recording that it was sent is stored once.
        """
        if mode not in METRIC_MODES:
            raise UsageError(f"mode must be one of {', '.join(METRIC_MODES)}, got {mode!r}")
        try:
            data = json.dumps(metrics, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"metrics must be JSON-serialisable with finite numbers: {exc}") from None
        c = self.leaf
        payload = json.dumps({"mode": mode, "aggregation_id": aggregation_id, "leaf_id": c.leaf_id,
                              "branch_id": c.branch_id, "tree_id": c.tree_id, "data": data})
        headers = self._headers() | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
        self._request("POST", "/api/v1/performance/analysis", expected=201, what="metrics", data=payload,
                      headers=headers)
        self.log.info("sent %s metrics for aggregation %s", mode, aggregation_id)

    # -- notifications -----------------------------------------------------------------

    def listen(self, ready_timeout: float = 10.0) -> NotificationListener:
        """Start the notification listener (once) and wait until it is connected and caught up."""
        with self._listener_lock:
            if self._listener is None:
                self._listener = self._make_listener().start()
        if not self._listener.wait_ready(ready_timeout):
            self.log.warning("notifications over %s not connected after %.0f s; still trying",
                             self._listener.transport, ready_timeout)
        return self._listener

    def _make_listener(self) -> NotificationListener:
        o, on_run_status, egress = self.options, self._on_run_status, self._egress
        if o.notification_transport == "amqp":
            return AmqpListener(host=o.amqp_hostname, port=o.amqp_port, tree_id=self.leaf.tree_id,
                                leaf_id=self.leaf.leaf_id, session_token=self._token, use_tls=o.amqp_tls,
                                keepalive_s=o.keepalive_s, on_run_status=on_run_status, egress=egress,
                                connect_timeout_s=o.connect_timeout_s)
        fetch = ticket_fetcher(self._ticket_session, f"{o.host}/api/v1/ws/ticket", self._headers(),
                               self._timeout, egress)
        return WebSocketListener(ticket=fetch, ws_base=o.ws_base, keepalive_s=o.keepalive_s,
                                 on_run_status=on_run_status, egress=egress)

    def _on_run_status(self, status: str) -> None:
        """Keep the cached run current; a `start` may mean a new run, so its number is refetched."""
        number = self._run.run_number if self._run else 0
        self._run = None if status == "start" else RunDetails(status, number)
        self._run_status_notices += 1

    @property
    def run_status_notices(self) -> int:
        """How many run status notices the listener has received (the aggregation wait checks the run on each)."""
        return self._run_status_notices

    def mark(self) -> int:
        """A position in the notice stream; take it before uploading (starts listening)."""
        return self.listen().mark()

    def wait_for_aggregation(self, timeout: float, *, after: int | None = None, exclude: Iterable[str] = (),
                             auto_ack: bool = True, for_round: tuple[int, int] | None = None) -> AggregationNotice:
        """Wait for the aggregation that follows an upload: the notice naming `for_round` (the
        upload's run and round) when notices name one, else the first notice after `after` (a mark).

        Raises `NotificationTimeout` (transient) when none arrives in `timeout` seconds.
        With `auto_ack=False`, call `acknowledge()` once the aggregation id is stored, so
        that a crash before then gets the notice again (AMQP).
        """
        if not math.isfinite(timeout) or timeout <= 0:
            raise UsageError("timeout must be a positive number of seconds")
        return self.listen().wait_for_aggregation(timeout, after=after, exclude=exclude, auto_ack=auto_ack,
                                                  for_round=for_round)

    @property
    def connections(self) -> int:
        """How many times the notification listener has connected (a reconnect may have missed notices)."""
        return self._listener.connections if self._listener is not None else 0

    def acknowledge(self, aggregation_id: str) -> None:
        """Acknowledge a notice taken with `auto_ack=False`."""
        if self._listener is not None:
            self._listener.acknowledge(aggregation_id)
