"""A loopback HTTP proxy in front of bk_server that injects faults on demand, a set number
of times: answer 503 (`503`), drop the connection before forwarding (`drop`) or after the
server answered (`drop-after`: the request took effect, the reply is lost), cut a response
short (`truncate`), or cut the link once 80 % of a request's body has arrived (`cut-80`).
With `rate` (bytes per second) it is also a slow link: request bodies and responses pass at
that rate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class Fault:
    """Inject `kind` into the next `times` requests whose path contains `path`."""

    kind: str
    path: str = ""
    times: int = 1


@dataclass
class FaultyProxy:
    backend: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list, repr=False)  # bearer tokens among them
    rate: float | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def inject(self, kind: str, path: str = "", times: int = 1) -> None:
        with self._lock:
            self.faults.append(Fault(kind, path, times))

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, p in self.seen if m == method and path_part in p)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _block(self) -> int:
        """The bytes passed at a time: a tenth of a second's worth on a slow link."""
        return max(4096, int(self.rate / 10)) if self.rate else 1 << 20

    def _pace(self, count: int) -> None:
        """Hold a slow link's bytes for as long as `rate` takes to pass them."""
        if self.rate:
            time.sleep(count / self.rate)

    def _take_fault(self, path: str) -> str | None:
        with self._lock:
            for fault in self.faults:
                if fault.path in path and fault.times > 0:
                    fault.times -= 1
                    return fault.kind
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return None

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fault = proxy._take_fault(self.path)
                body = self._receive(int(length * 0.8) if fault == "cut-80" else length) if length else None
                proxy.seen.append((self.command, self.path))
                proxy.headers_seen.append(dict(self.headers))
                if fault in ("drop", "cut-80"):
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    self._reply(503, {"Content-Type": "application/json"},
                                b'{"error": "injected: service unavailable"}')
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Host"] = self.headers.get("Host", "")
                response = requests.request(self.command, proxy.backend + self.path, headers=headers, data=body,
                                            timeout=120, allow_redirects=False)
                out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
                content = response.content
                if fault == "drop-after":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "truncate":
                    self._reply(response.status_code, out_headers, content[: len(content) // 2], length=len(content))
                    self.close_connection = True
                    return
                self._reply(response.status_code, out_headers, content)

            def _reply(self, status: int, headers: dict[str, str], body: bytes, length: int | None = None) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                for start in range(0, len(body), proxy._block()):
                    self.wfile.write(body[start:start + proxy._block()])
                    proxy._pace(min(proxy._block(), len(body) - start))
                self.wfile.flush()

            def _receive(self, count: int) -> bytes:
                """`count` bytes of the request body, at the proxy's rate."""
                parts, left = [], count
                while left:
                    part = self.rfile.read(min(left, proxy._block()))
                    if not part:
                        break
                    parts.append(part)
                    left -= len(part)
                    proxy._pace(len(part))
                return b"".join(parts)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        return Handler


ProxyFactory = Callable[[str], FaultyProxy]
