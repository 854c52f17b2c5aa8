"""What the benchmark scripts share: child processes and their memory, bk-server, RabbitMQ, tables, headers.

The scripts in this folder import it as ``from harness import ...``: running ``python bench/<name>.py``
puts ``bench/`` first on ``sys.path``, for the script and for the children it re-runs itself as.
Kept light on imports: a child's ``ru_maxrss`` starts at its parent's peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import requests

from prefect_branchkey.bk_dev.local_platform import LocalServer

MB = 10**6
GB = 10**9
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBIT_ADMIN = "http://127.0.0.1:15672"
RABBIT_AUTH = ("guest", "guest")
WEBSOCKET, AMQP = "websocket", "amqp"
ROUND_TIMEOUT_S = 300.0
INHERITED_PEAK_WARNING = 64 * MB

CHILD_OPTION = "--one"

T = TypeVar("T")


def progress(message: str) -> None:
    """Report progress on stderr, so stdout holds only the tables (or JSON)."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Child processes: one job, such as one measured call, per fresh interpreter.
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (`ru_maxrss`, a high-water mark), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    """This process's current resident set size in bytes, where /proc says it (else None)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process and its descendants so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(call: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """Run `call` once; return its result, wall seconds and the peak RSS increase it caused."""
    gc.collect()
    current = current_rss_bytes()
    before = peak_rss_bytes()
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    after = peak_rss_bytes()
    inherited = before - current if current is not None else 0
    return result, {"seconds": seconds, "peak_increase": after - before, "inherited_peak": inherited}


def answer_child(spec_json: str, tasks: Mapping[str, Callable[[dict[str, Any]], Any]]) -> None:
    """The child's side of `run_child`: do the JSON spec's task and print its JSON answer on stdout."""
    spec = json.loads(spec_json)
    task = tasks.get(spec["task"])
    if task is None:
        raise ValueError(f"unknown task {spec['task']!r}")
    print(json.dumps(task(spec)), flush=True)


def run_child(script: str | Path, spec: dict[str, Any], env: Mapping[str, str] | None = None) -> Any:
    """Run `script --one <spec as JSON>` in a fresh interpreter (with `env`, default ours) and return
    the JSON it printed last."""
    command = [sys.executable, str(Path(script).resolve()), CHILD_OPTION, json.dumps(spec)]
    # A child that dies of a signal prints every thread's Python stack on its stderr (ours).
    child_env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    completed = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True, env=child_env)
    if completed.returncode != 0:
        raise RuntimeError(f"child {spec['task']} failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_measurement(script: str | Path, spec: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`run_child` for a `measure` answer; warn (after `prefix`) when its baseline may understate the peak."""
    stats = run_child(script, spec)
    if stats["inherited_peak"] > INHERITED_PEAK_WARNING:
        progress(f"{prefix}warning: the child's peak RSS was already {stats['inherited_peak'] / MB:.0f} MB "
                 "above its current RSS before the call; its increase may be understated")
    return stats


# ---------------------------------------------------------------------------------------------
# Models, statistics, output.
# ---------------------------------------------------------------------------------------------


def layer_shapes(size_mb: float, layers: int) -> list[tuple[int, ...]]:
    """Shapes of a float32 model of `size_mb` MB in `layers` layers: 1000-column matrices, a vector last."""
    total = max(layers, round(size_mb * MB / 4))
    per_layer = total // layers
    shapes: list[tuple[int, ...]] = []
    used = 0
    for _ in range(layers - 1):
        cols = min(1000, per_layer)
        rows = max(1, per_layer // cols)
        shapes.append((rows, cols))
        used += rows * cols
    shapes.append((total - used,))
    return shapes


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def format_table(headings: Sequence[str], cells: Sequence[Sequence[str]], left: Collection[int] = (0,)) -> str:
    """Rows as a fixed-width plain-text table: the columns in `left` left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in [headings, *cells]) for i in range(len(headings))]

    def line(values: Sequence[str]) -> str:
        padded = (v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=False)))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headings), rule, *(line(values) for values in cells)])


def library_versions(*names: str) -> str:
    """`name version` of each installed distribution named, comma-separated (missing ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in names:
        with suppress(PackageNotFoundError):
            parts.append(f"{name} {version(name)}")
    return ", ".join(parts)


def machine_summary(*libraries: str) -> str:
    """The first header line: `# <arch>, <n> CPUs, <RAM>; Python <version>, <library versions>`."""
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return (f"# {platform.machine()}, {os.cpu_count()} CPUs, {ram_gb:.1f} GB RAM; "
            f"Python {platform.python_version()}, {library_versions(*libraries)}")


# ---------------------------------------------------------------------------------------------
# Command line and work directory.
# ---------------------------------------------------------------------------------------------


def size_list(example: str) -> Callable[[str], list[float]]:
    """An argparse type: a comma-separated list of positive sizes in MB, such as `example`."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive sizes in MB like {example}, got {text!r}")
        return values

    return parse


def add_common_options(parser: argparse.ArgumentParser, seed_of: str, quick_help: str, json_help: str,
                       children: bool = False) -> None:
    """The options every script takes: --workdir, --seed, --quick, --json; with `children`, the hidden --one."""
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to create the temporary directory (default /tmp)")
    parser.add_argument("--seed", type=int, default=0, help=f"RNG seed for the {seed_of}")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help=json_help)
    if children:
        parser.add_argument(CHILD_OPTION, help=argparse.SUPPRESS)


@contextmanager
def temporary_root(base: Path | None, prefix: str) -> Iterator[Path]:
    """A fresh directory named `prefix...` under `base` (default: the system's temporary directory), removed after."""
    parent = base if base is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# RabbitMQ and bk-server.
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchServer(LocalServer):
    """A LocalServer that remembers its federations (to clean the broker after) and waits for rounds."""

    federations: list[dict[str, Any]] = field(default_factory=list)

    def start(self, timeout: float = 30) -> BenchServer:
        """Start as LocalServer does; on failure say the log's last lines (the work directory goes away)."""
        try:
            super().start(timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from exc
        return self

    def stop(self, hard: bool = False) -> None:
        """Stop as LocalServer does, then with SIGKILL if the process lingers."""
        try:
            super().stop(hard)
        except subprocess.TimeoutExpired:
            super().stop(hard=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def federation(self, name: str, leaves: int) -> dict[str, Any]:
        """A tree and branch called `name` whose rounds close when all `leaves` leaves have uploaded (run started)."""
        data = self.create_federation(leaves, tree=name, branch=name)
        self.federations.append(data)
        return data

    def rounds(self, branch_id: str) -> list[dict[str, Any]]:
        return self.status(branch_id)["rounds"]

    def wait_for_round(self, branch_id: str, round_number: int, timeout: float = ROUND_TIMEOUT_S) -> dict[str, Any]:
        """Poll the admin API until a round is aggregated; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.rounds(branch_id):
                if r["round"] == round_number and r["status"] == "aggregated":
                    return r
                if r["round"] == round_number and r["status"] == "failed":
                    raise RuntimeError(f"aggregation of round {round_number} failed:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"round {round_number} of {branch_id} not aggregated within {timeout:.0f} s")

    def cleanup_broker(self) -> None:
        """Remove the vhosts and users this server provisioned on RabbitMQ for its federations."""
        if not self.amqp_url:
            return
        for federation in self.federations:
            paths = [f"vhosts/{federation['tree_id']}", *(f"users/{leaf['id']}" for leaf in federation["leaves"])]
            for path in paths:
                try:
                    response = requests.delete(f"{RABBIT_ADMIN}/api/{path}", auth=RABBIT_AUTH, timeout=10)
                except requests.RequestException as exc:
                    progress(f"warning: could not remove {path} from RabbitMQ: {exc}")
                    continue
                if response.status_code not in (204, 404):
                    progress(f"warning: RabbitMQ refused to remove {path}: {response.status_code}")
