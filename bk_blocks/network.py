"""How a leaf's connections leave its machine: one CA bundle and one egress proxy for every transport.

Invariants:

- `ca_bundle` is PEM text when it starts (after blanks) with `-----BEGIN`, otherwise a path on
  the machine that runs the leaf (`~` expanded). It is checked where it is given (PEM text must
  load, and must hold no private key) and, for a path, where the client is built (the file must
  exist there). Given, it replaces the default trust store for every transport, as requests'
  `verify=<path>` and curl's `--cacert` do: requests gets a file path (PEM text is written to a
  temporary file once per client, removed when the client closes), websockets and pika the same
  `ssl.SSLContext`.
- `proxy_url` is an `http://host:port` proxy that tunnels with CONNECT, without credentials
  (it is not a secret field). Set, every connection to the platform goes through it: requests'
  `proxies`, websockets' `proxy=`, and for AMQP a CONNECT tunnel opened here and handed to
  pika through a loopback port (`LoopbackTunnel`: pika takes no proxy and opens its own
  socket). TLS stays end to end; the tunnel carries ciphertext. Unset, HTTP and WebSocket follow
  the standard environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) as requests and
  websockets do by default; AMQP, which no standard variable covers, connects directly.
- A certificate that is not trusted and a proxy that refuses a tunnel (403, 405, 407) are final
  errors (`CertificateError`, `ProxyRefusedError`), each one line naming the problem and the
  setting that fixes it; `final_error` finds them under the wrappers each library adds. Every
  other connection failure stays whatever the caller makes it (transient).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import tempfile
import threading
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from prefect_branchkey.bk_blocks.errors import BranchKeyError, CertificateError, ConfigurationError, ProxyRefusedError

PEM_BEGIN = "-----BEGIN"
# Proxy answers to CONNECT that a retry cannot get past: forbidden by policy, no CONNECT, credentials wanted.
FINAL_PROXY_STATUS = frozenset({403, 405, 407})
_MAX_CONNECT_REPLY = 64 * 1024
_TUNNEL_REFUSAL = re.compile(r"Tunnel connection failed: (\d{3})\s*(.*)")
_OPENSSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")
# OpenSSL's verify codes with a hint of their own (the rest are about the CA).
_NOT_YET_VALID, _EXPIRED, _HOSTNAME_MISMATCH, _IP_MISMATCH = 9, 10, 62, 64


def is_pem_text(value: str) -> bool:
    """Whether a `ca_bundle` value is PEM text (else it is a path)."""
    return value.lstrip().startswith(PEM_BEGIN)


def check_ca_bundle(value: str | None) -> str | None:
    """A `ca_bundle` value as kept: None when empty; PEM text that loads as CA certificates and
    holds no private key; or a path (one line), checked later where the leaf runs."""
    if value is None or not value.strip():
        return None
    if not is_pem_text(value):
        if "\n" in value.strip():
            raise ValueError("ca_bundle must be a path to a PEM file, or PEM text starting with "
                             "'-----BEGIN CERTIFICATE-----'")
        return value.strip()
    text = value.strip() + "\n"
    if "PRIVATE KEY" in text:
        raise ValueError("ca_bundle holds a private key: give only the CA's certificate (a key is a secret and "
                         "ca_bundle is not a secret field)")
    try:
        ssl.create_default_context(cadata=text)
    except ssl.SSLError as exc:
        raise ValueError(f"ca_bundle's PEM text does not load as CA certificates: {_openssl_text(exc)}") from None
    return text


def check_proxy_url(value: str | None) -> str | None:
    """A `proxy_url` as kept: None when empty, else `http://host[:port]` (no credentials, path or
    query). The value is never echoed: a mistaken one may carry a password."""
    if value is None or not value.strip():
        return None
    parts = urlsplit(value.strip())
    if parts.scheme != "http":
        raise ValueError("proxy_url must be an http:// URL of a proxy that tunnels with CONNECT, like "
                         f"http://proxy.example.org:3128 (got a {parts.scheme or 'schemeless'} URL)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("proxy_url must not carry a user name or password (it is not a secret field); "
                         "a proxy that needs credentials is not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("proxy_url has a port that is not a number from 1 to 65535") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("proxy_url must be just http://host:port, with no path, query or fragment")
    return f"http://{parts.netloc}" if port else f"http://{parts.netloc}:80"


def origin(url: str) -> str:
    """`scheme://host:port` of a URL: what an error may name (never a path or query: a
    pre-signed URL's query is a credential, a WebSocket URL's holds its ticket)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def environment_proxy(host: str) -> str | None:
    """The proxy the standard environment gives for https:// on `host` (None when unset or
    bypassed by `NO_PROXY`), as requests and websockets read it."""
    if urllib.request.proxy_bypass(host):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get("https") or proxies.get("all")


class Egress:
    """One client's trust and proxy, as each library takes them. `close()` removes the CA file
    written from PEM text (also removed when the object is collected or the process exits)."""

    def __init__(self, *, ca_bundle: str | None, verify_tls: bool, proxy_url: str | None,
                 proxies: dict[str, str] | None) -> None:
        self.proxy_url = proxy_url
        self.ca_bundle = ca_bundle
        self.verify_tls = verify_tls
        self._legacy_proxies = proxies
        self._ca_file: str | None = None
        self._remove_ca_file: weakref.finalize | None = None
        self._context: ssl.SSLContext | None = None
        if verify_tls and ca_bundle is not None:
            self._ca_file = self._materialise(ca_bundle)
            self._context = self._load(self._ca_file)

    def _materialise(self, ca_bundle: str) -> str:
        """The CA bundle as a file path: a path as given (it must be a file here), PEM text
        written once to a private temporary file."""
        if not is_pem_text(ca_bundle):
            path = Path(ca_bundle).expanduser()
            if not path.is_file():
                raise ConfigurationError(f"ca_bundle {path} is not a file on this machine")
            return str(path)
        handle, name = tempfile.mkstemp(prefix="branchkey-ca-", suffix=".pem")
        with os.fdopen(handle, "w") as file:
            file.write(ca_bundle)
        self._remove_ca_file = weakref.finalize(self, _remove_quietly, name)
        return name

    def _load(self, ca_file: str) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            where = "its PEM text" if is_pem_text(self.ca_bundle or "") else ca_file
            raise ConfigurationError(f"ca_bundle ({where}) does not load as CA certificates: "
                                     f"{_openssl_text(exc)}") from None

    @property
    def requests_verify(self) -> bool | str:
        """requests' `verify`: off, the CA file, or True (requests' own CAs, or `REQUESTS_CA_BUNDLE`)."""
        if not self.verify_tls:
            return False
        return self._ca_file or True

    @property
    def requests_proxies(self) -> dict[str, str] | None:
        """requests' `proxies`: `proxy_url` for both schemes, else the older `proxies` field, else
        None (the environment's, as requests reads it)."""
        if self.proxy_url:
            return {"http": self.proxy_url, "https": self.proxy_url}
        return self._legacy_proxies

    @property
    def websocket_proxy(self) -> str | Literal[True]:
        """websockets' `proxy`: `proxy_url`, else True (the environment's, as websockets reads it)."""
        return self.proxy_url or True

    def ssl_context(self) -> ssl.SSLContext:
        """The context a WebSocket or AMQP connection verifies the platform with (one, shared)."""
        if self._context is None:
            self._context = ssl.create_default_context()
            if not self.verify_tls:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        return self._context

    def final_error(self, exc: BaseException, where: str) -> BranchKeyError | None:
        """The final error an exception (or what it wraps) amounts to, talking to `where`: an
        untrusted certificate or a proxy's refusal; None for everything a retry may fix."""
        for cause in _causes(exc):
            if isinstance(cause, ssl.SSLCertVerificationError):
                return self.certificate_error(cause, where)
            if isinstance(cause, ProxyRefusedError):
                return cause
            match = _TUNNEL_REFUSAL.match(str(cause)) if isinstance(cause, OSError) else None
            if match and int(match.group(1)) in FINAL_PROXY_STATUS:
                return self.proxy_refused(int(match.group(1)), match.group(2), where)
        return None

    def certificate_error(self, problem: ssl.SSLCertVerificationError, where: str) -> CertificateError:
        """One line: whose certificate, OpenSSL's reason, and what to change."""
        reason = problem.verify_message or _openssl_text(problem)
        if problem.verify_code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
            hint = "the Block's host must be a name the certificate lists"
        elif problem.verify_code in (_NOT_YET_VALID, _EXPIRED):
            hint = "the certificate is outside its dates (or this machine's clock is wrong)"
        elif self._ca_file is not None:
            hint = ("the Block's ca_bundle did not sign it; give the Block the CA bundle that did "
                    "(behind a TLS-inspecting proxy: the proxy's CA)")
        else:
            hint = "give the Block the CA bundle that signed it (ca_bundle)"
        return CertificateError(f"TLS certificate of {origin(where)} not trusted: {reason}; {hint}", reason)

    def proxy_refused(self, status: int, reason: str, where: str) -> ProxyRefusedError:
        """One line: which proxy refused which tunnel, and why that is final."""
        proxy = f"proxy {self.proxy_url}" if self.proxy_url else "the proxy (from the environment)"
        why = {407: "it wants credentials, which proxy_url cannot carry",
               405: "it does not tunnel with CONNECT"}.get(status, "its policy must allow CONNECT there")
        target = urlsplit(where).netloc.rpartition("@")[2] or where
        return ProxyRefusedError(f"{proxy} refused the tunnel to {target}: {status} {reason.strip()}".rstrip()
                                 + f"; {why}", status)

    def close(self) -> None:
        """Remove the CA file written from PEM text, if any."""
        if self._remove_ca_file is not None:
            self._remove_ca_file()


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _openssl_text(exc: BaseException) -> str:
    """An ssl error's words without OpenSSL's source location."""
    text = str(exc) or str(getattr(exc, "reason", None) or "") or type(exc).__name__
    return _OPENSSL_LOCATION.sub("", text)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """An exception and everything it wraps: causes, contexts, exceptions among its args (also in
    lists, as pika keeps its attempts) and in `reason`/`exception`/`exceptions` (urllib3, pika)."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner: list[object] = [current.__cause__, current.__context__, *current.args]
        inner += [getattr(current, name, None) for name in ("reason", "exception", "exceptions")]
        for item in inner:
            if isinstance(item, BaseException):
                stack.append(item)
            elif isinstance(item, (list, tuple)):
                stack.extend(x for x in item if isinstance(x, BaseException))


def open_tunnel(egress: Egress, host: str, port: int, timeout: float) -> socket.socket:
    """A socket to host:port through `egress.proxy_url`'s CONNECT tunnel, ready for the protocol
    (the caller starts TLS inside it). A refusal of 403, 405 or 407 is `ProxyRefusedError`; any
    other failure a `ConnectionError`, which the caller retries."""
    assert egress.proxy_url is not None
    proxy = urlsplit(egress.proxy_url)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection((proxy.hostname or "", proxy.port or 80), timeout=timeout)
    except OSError as exc:
        raise ConnectionError(f"proxy {egress.proxy_url} unreachable: {exc.strerror or exc}") from None
    try:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: prefect-branchkey\r\n\r\n".encode())
        status, reason = _connect_reply(sock)
        if status != 200:
            if status in FINAL_PROXY_STATUS:
                raise egress.proxy_refused(status, reason, f"tcp://{target}")
            raise ConnectionError(f"proxy {egress.proxy_url} could not open a tunnel to {target}: {status} {reason}")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def _connect_reply(sock: socket.socket) -> tuple[int, str]:
    """The status of the proxy's answer to CONNECT, its head read byte by byte so that not one
    byte of the tunnel behind it is taken."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError("the proxy closed the connection instead of answering CONNECT")
        head += byte
        if len(head) > _MAX_CONNECT_REPLY:
            raise ConnectionError("the proxy's answer to CONNECT has no end")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectionError(f"the proxy answered CONNECT with {status_line[:80]!r}, not HTTP")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


class LoopbackTunnel:
    """A port on 127.0.0.1 whose first connection is joined, byte for byte in both directions, to
    an open tunnel socket: how pika, which opens its own socket and takes no proxy, is carried
    through one. The port takes that one connection and closes; the tunnel ends when either side
    closes, or at `close()`. Nothing is read or changed in passing (TLS is end to end)."""

    def __init__(self, upstream: socket.socket, accept_timeout: float) -> None:
        self._upstream = upstream
        self._local: socket.socket | None = None
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(accept_timeout)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, name="bk-proxy-tunnel", daemon=True).start()

    def _serve(self) -> None:
        try:
            local, _ = self._listener.accept()
        except OSError:
            self.close()
            return
        finally:
            self._listener.close()
        local.settimeout(None)
        self._local = local
        if self._closed.is_set():
            _shut(local)
            return
        threading.Thread(target=_pump, args=(self._upstream, local), name="bk-proxy-tunnel-in", daemon=True).start()
        _pump(local, self._upstream)

    def close(self) -> None:
        """End the tunnel and both of its sockets (harmless when already ended)."""
        self._closed.set()
        _shut(self._listener)
        _shut(self._upstream)
        if self._local is not None:
            _shut(self._local)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes until `source` ends, then end `sink`'s sending side; an error ends both."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
    except OSError:
        _shut(source)
        _shut(sink)


def _shut(sock: socket.socket) -> None:
    """Shut a socket down (waking any thread blocked on it) and close it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
