"""Child processes for the development tooling: start, wait for, and stop servers.

Its children never outlive it: each gets its own process group (stopping it stops what
it started, and a terminal's Ctrl-C reaches only the parent, which then stops the
children in order) and asks the kernel for SIGTERM should the parent die uncleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

PR_SET_PDEATHSIG = 1
# Looked up once here: the child runs between fork and exec, where loading a library is unsafe.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with(parent: int) -> Callable[[], None]:
    """What the child runs before exec: ask for SIGTERM when the parent dies, and exit at
    once if it died already (between the fork and this call)."""

    def arrange() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return arrange


def spawn(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, user: str | None = None) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group, output appended to `log_path` (as `user`, with
    that user's group, when given: root starting a server that refuses root)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                user=user, group=user, extra_groups=[] if user else None,
                                preexec_fn=_die_with(os.getpid()))


def stop_group(process: subprocess.Popen[bytes], timeout: float = 20, hard: bool = False) -> None:
    """SIGTERM the child's process group (unless `hard`); after `timeout` seconds (or once
    the child has exited) SIGKILL whatever of the group is left."""
    if not hard:
        _signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


class ServerStartError(RuntimeError):
    """A server process exited, or did not answer, before it was ready."""


def wait_until_answering(process: subprocess.Popen[bytes], url: str, timeout: float, log_path: Path,
                         what: str, verify: ssl.SSLContext | bool = True) -> None:
    """Poll `url` until it answers 2xx (an https:// one verified by `verify`); ServerStartError if
    the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, verify=verify) as http:  # one TLS context for every poll: each costs ~20 ms of CPU
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(f"{what} exited with {process.returncode}; see {log_path}")
            try:
                if http.get(url).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise ServerStartError(f"{what} did not answer {url} within {timeout:.0f} s; see {log_path}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_available(host: str = "127.0.0.1") -> bool:
    """Whether RabbitMQ answers on 5672 and its management API (guest) on 15672."""
    try:
        with socket.create_connection((host, 5672), timeout=1):
            pass
        return httpx.get(f"http://{host}:15672/api/overview", auth=("guest", "guest"), timeout=2).is_success
    except (OSError, httpx.HTTPError):
        return False
