"""A TLS-terminating relay on loopback: clients speak TLS to it with a test certificate, it speaks
plain TCP to a target port, as an AMQPS listener in front of a broker does. It lets a test give
pika a real TLS handshake with a throwaway CA against the shared plain broker on 5672, which it
neither reconfigures nor restarts. Runs its own asyncio loop in a thread; counts handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path


class TlsRelay:
    """TLS on 127.0.0.1:`port` (certificate `certfile`, key `keyfile`), plain to 127.0.0.1:`target_port`."""

    def __init__(self, target_port: int, certfile: Path, keyfile: Path) -> None:
        self.target_port = target_port
        self.handshakes = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(str(certfile), str(keyfile))
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-tls-relay", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self._context)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, target_writer}
        await asyncio.gather(_copy(reader, target_writer), _copy(target_reader, writer))
        self._writers -= {writer, target_writer}

    def close(self) -> None:
        """Stop accepting, end every relayed connection, stop the loop."""

        async def stop() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the reader ends or either side fails, then close the writer."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()
