"""A loopback egress proxy that only tunnels, as a hospital's edge proxy does, and counts.

`CONNECT host:port` to a host in its `hosts` map is answered 200 and joined byte for byte to
the address the map gives: those names resolve nowhere else (a `.invalid` name never resolves
on the machine itself), so a client that reached one went through this proxy. Anything else is
refused and recorded: another method (a plain-HTTP proxy request) 405, an unknown host 403.
Nothing is decrypted: TLS runs end to end inside the tunnel."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class ConnectProxy:
    """Tunnel CONNECTs to the names in `hosts` (name -> IP address) on 127.0.0.1:`port`."""

    hosts: dict[str, str]
    tunnels: list[tuple[str, int]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="test-connect-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, port: int | None = None) -> int:
        """How many tunnels were opened (to `port`, when given)."""
        with self._lock:
            return sum(1 for _, target_port in self.tunnels if port is None or target_port == port)

    def close(self) -> None:
        """Stop listening and end every tunnel."""
        _shut(self._listener)
        with self._lock:
            for sock in self._sockets:
                _shut(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = _read_head(client)
        if head is None:
            _shut(client)
            return
        request_line = head.split("\r\n", 1)[0]
        method, _, rest = request_line.partition(" ")
        target = rest.split(" ", 1)[0]
        host, _, port_text = target.rpartition(":")
        host = host.strip("[]")
        if method != "CONNECT" or not port_text.isdigit():
            self._refuse(client, request_line, "405 Method Not Allowed")
            return
        if host not in self.hosts:
            self._refuse(client, request_line, "403 Forbidden")
            return
        try:
            upstream = socket.create_connection((self.hosts[host], int(port_text)), timeout=5)
        except OSError:
            self._refuse(client, request_line, "502 Bad Gateway")
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.append(upstream)
            self.tunnels.append((host, int(port_text)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def _refuse(self, client: socket.socket, request_line: str, status: str) -> None:
        with self._lock:
            self.refused.append(request_line)
        with contextlib.suppress(OSError):
            client.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        _shut(client)


def _read_head(client: socket.socket) -> str | None:
    """The request's head, read byte by byte (the tunnel's first bytes stay unread); None if it ends first."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        try:
            byte = client.recv(1)
        except OSError:
            return None
        if not byte or len(head) > 65536:
            return None
        head += byte
    return head.decode("latin-1")


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
    except OSError:
        _shut(source)
        _shut(sink)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
