"""Leaf runs forked from a process that has already imported a leaf's modules.

A fault test starts five or so leaf runs, and each new interpreter spent most of its CPU
importing Prefect (1-2 s of the ~2.5 s a short run costs). Here a multiprocessing fork server
imports them once per test worker (tests/support/forkserver.py), and each run is a fresh OS
process forked from it: its own pid, memory, sockets and exit status, killable with SIGKILL like
any process. Only the imports are shared: nothing has run in the fork server, which holds no
connections and no Python thread (pyarrow's jemalloc keeps a native one, which jemalloc's own fork
handlers account for).

Invariant: a run sees exactly the environment it was given (the fork server's is replaced,
and Prefect's settings are read again from it), writes stdout and stderr to its log, and runs
the interpreter's exit handlers (Prefect flushes its logs and events there) before it exits.
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import subprocess
import sys
from multiprocessing.process import BaseProcess
from pathlib import Path

from ...support.forkserver import CONTEXT

LEAF_MODULE = "tests.e2e.faults.leaf"


def _run_leaf(arguments: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """The body of a forked run: the leaf's environment and output, `python -m` semantics."""
    os.environ.clear()
    os.environ.update(env)
    import prefect.context

    prefect.context.refresh_global_settings_context()
    os.chdir(cwd)
    with open(log, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    sys.argv = [LEAF_MODULE, *arguments]
    try:
        runpy.run_module(LEAF_MODULE, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends its children with os._exit, which skips them


class LeafRun:
    """A forked leaf run, read and signalled like a `subprocess.Popen`."""

    def __init__(self, process: BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: signal.Signals) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(LEAF_MODULE, timeout or 0)
        return self._process.exitcode


def start_leaf(arguments: list[str], env: dict[str, str], cwd: Path, log: Path) -> LeafRun:
    """Fork a run of `python -m tests.e2e.faults.leaf ARGUMENTS` (the log is truncated first)."""
    log.write_bytes(b"")
    process = CONTEXT.Process(target=_run_leaf, args=(arguments, env, str(cwd), str(log)), daemon=False)
    process.start()
    return LeafRun(process)
