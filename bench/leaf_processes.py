"""A federation whose leaves are processes of their own, as at real sites: a Prefect server on the
embedded PostgreSQL, a bk-server, the federation's credentials files, and one child process per
leaf running a benchmark script's `--leaf` mode. Everything it started is stopped at the end."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect_branchkey.bk_dev.local_platform import LocalServer
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.bk_dev.processes import spawn, stop_group
from prefect_branchkey.bk_server.cli import write_credentials


def add_leaf_run_options(parser: argparse.ArgumentParser) -> None:
    """`--workdir` and `--json`, and the hidden `--leaf SPEC` a leaf process is started with."""
    parser.add_argument("--workdir", type=Path, default=None, help="where to create the temporary directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--leaf", help=argparse.SUPPRESS)


@dataclass
class LeafFederation:
    """The servers, each leaf's credentials file and name, and the leaf processes once started."""

    root: Path
    prefect: LocalPrefectServer
    platform: LocalServer
    credentials: list[Path]
    names: list[str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def work_dir(self, name: str) -> Path:
        return self.root / "leaves" / name

    def start_leaves(self, script: str, spec_of: Callable[[int], dict[str, Any]],
                     env: dict[str, str] | None = None) -> None:
        """One `python SCRIPT --leaf SPEC` per leaf, SPEC its credentials, host and work dir plus
        `spec_of(index)`, with `env` added to the Prefect client's; each logs to `<root>/<leaf>.log`."""
        for index, (name, path) in enumerate(zip(self.names, self.credentials, strict=True)):
            spec = {"credentials": str(path), "host": self.platform.url, "work_dir": str(self.work_dir(name)),
                    **spec_of(index)}
            self.processes.append(spawn([sys.executable, script, "--leaf", json.dumps(spec)], self.log(name),
                                        env={**self.prefect.client_env(), **(env or {})}, cwd=Path(script).parent))

    def wait(self, timeout: float) -> None:
        """Wait for every leaf to end; a leaf that failed raises with its log's tail."""
        for name, process in zip(self.names, self.processes, strict=True):
            if process.wait(timeout=timeout) != 0:
                raise RuntimeError(f"{name} failed:\n" + self.log(name).read_text(errors="replace")[-3000:])


@contextmanager
def leaf_federation(root: Path, leaves: int, name: str) -> Iterator[LeafFederation]:
    """Servers and a federation of `leaves` leaves (tree and branch called `name`), stopped after."""
    prefect = LocalPrefectServer(root / "prefect", database="postgres")
    platform = LocalServer(root / "bk" / "data")
    federation: LeafFederation | None = None
    try:
        prefect.start()
        platform.start()
        created = platform.create_federation(leaves, tree=name, branch=name)
        federation = LeafFederation(root, prefect, platform, write_credentials(root / "creds", created["leaves"]),
                                    [leaf["name"] for leaf in created["leaves"]])
        yield federation
    finally:
        for process in federation.processes if federation else []:
            stop_group(process)
        platform.stop()
        prefect.stop()
