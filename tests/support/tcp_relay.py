"""A loopback TCP relay whose open connections can be silently severed: `sever()` stops
forwarding on every connection open now, in both directions, without closing either socket,
as a NAT gateway or firewall that forgets an idle connection does. Only keepalives notice
such a connection is dead; new connections pass normally. `sever(opened_with=...)` severs only
the connections whose first bytes from the client contain a marker (e.g. a WebSocket upgrade),
leaving pooled HTTP connections alone."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Link:
    sockets: tuple[socket.socket, socket.socket]
    severed: threading.Event = field(default_factory=threading.Event)
    opening: bytes = b""


class TcpRelay:
    """Forward 127.0.0.1:`port` to `target_port` on 127.0.0.1."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def sever(self, opened_with: bytes = b"") -> int:
        """Stop forwarding on the open connections (those whose client began with `opened_with`),
        leaving both ends open and unaware; return how many were severed."""
        with self._lock:
            chosen = [link for link in self._links if opened_with in link.opening and not link.severed.is_set()]
        for link in chosen:
            link.severed.set()
        return len(chosen)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for link in self._links:
                for sock in link.sockets:
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            link = _Link((client, server))
            with self._lock:
                self._links.append(link)
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, link), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, link), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, link: _Link) -> None:
        """Copy bytes until either end closes; once severed, read and drop them."""
        try:
            while data := source.recv(65536):
                if source is link.sockets[0] and not link.opening:
                    link.opening = data
                if not link.severed.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        if not link.severed.is_set():
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
