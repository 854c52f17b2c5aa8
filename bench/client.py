"""Benchmark the leaf client against a real local bk-server: transfer rates, client memory, notice latency.

Two tables, both measured against `bk-server serve` processes this script starts on 127.0.0.1
(free ports, data dirs in a temporary work directory removed at the end):

1. Transfer. For each archive size (default 10, 100 and 500 MB of float32 in ``--layers`` layers)
   it reports upload and download throughput (archive MB / wall s) and the client's peak RSS
   increase during each call, for two clients:

   - ``bk_blocks``: `BranchKeyClient.upload` (validates the archive, hashes it, streams it from disk
     with the 3.x integrity headers) and `BranchKeyClient.download` (streams to a temporary file,
     fsyncs, validates, renames);
   - ``requests``: what the official 2.x/3.x clients do, as a baseline: ``requests.post(...,
     files={"file": handle}, data={"data": ...})``, which reads the whole archive into memory and
     builds the multipart body there, and a download that keeps ``response.content`` in memory
     before writing it out (no fsync, no validation).

   Each size gets its own one-leaf federation with ``min_updates=1`` on a WebSocket-only server, so
   every upload closes a round and yields an aggregate of the same size, which is then downloaded.
   Every call runs in a fresh interpreter (this script with the hidden ``--one`` argument); the
   archive is written beforehand by another child, and the child's baseline (``ru_maxrss``) is taken
   after its imports and client set-up, just before the call, as in ``bench/aggregate.py``.

2. Notification latency per transport (``websocket`` on the same server; ``amqp`` on a second
   server started with ``--amqp-url``, skipped when no RabbitMQ answers on 127.0.0.1:5672). A one-leaf
   federation and a tiny model; one warm-up round, then K rounds (default 30) of ``mark()``,
   ``upload()``, ``wait_for_aggregation(after=mark)``. A round's latency is the local ``time.time()``
   when ``wait_for_aggregation`` returned minus the round's ``aggregated_at`` from the admin API
   (the server's ``time.time()`` when it stored the aggregate, just before it notifies), fetched
   after the rounds. Same machine, same clock. ``recv p50`` is the same with the listener thread's
   receive time instead, i.e. without the hand-over to the waiting thread.

All of it runs over loopback with a warm page cache (archives just written, nothing dropped), and the
server competes with the client for the same CPUs: these are upper bounds on throughput and lower
bounds on latency, not network figures. MB is 10**6 bytes. Progress goes to stderr.

Run from the project root:

    .venv/bin/python bench/client.py --quick     # sizes 10, 50 MB; 10 rounds: a smoke run
    .venv/bin/python bench/client.py             # sizes 10, 100, 500 MB; 30 rounds: a few minutes
    .venv/bin/python bench/client.py --sizes 200 --rounds 100 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests

MB = 10**6
GB = 10**9
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBIT_ADMIN = "http://127.0.0.1:15672"
RABBIT_AUTH = ("guest", "guest")
WEBSOCKET, AMQP = "websocket", "amqp"
BK_BLOCKS, REQUESTS = "bk_blocks", "requests"
# What the official 2.x client sends as metadata (Python-looking text, not JSON).
V2_METADATA = "{'key1':'value1', 'key2':'value2'}"
NOTICE_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 300.0
SERVER_START_TIMEOUT_S = 30.0
INHERITED_PEAK_WARNING = 64 * MB

T = TypeVar("T")


@dataclass(frozen=True)
class TransferRow:
    """One line of the transfer table: one client, one archive size."""

    client: str
    size_mb: float
    archive_mb: float
    upload_mb_s: float
    download_mb_s: float
    upload_rss_mb: float
    download_rss_mb: float


@dataclass(frozen=True)
class LatencyRow:
    """One line of the latency table: one transport's K rounds, in milliseconds."""

    transport: str
    rounds: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    recv_p50_ms: float


# ---------------------------------------------------------------------------------------------
# Child side: one archive, one timed call or one latency run per fresh interpreter.
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


def write_archive(path: Path, size_mb: float, layers: int, seed: int) -> int:
    """Write a random float32 update of `size_mb` MB with `write_update`; return its size in bytes."""
    from bk_blocks.archive import write_update

    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(size_mb, layers)]
    write_update(path, float(rng.integers(100, 10_000)), arrays)
    return path.stat().st_size


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


def make_client(spec: dict[str, Any]) -> Any:
    """A `BranchKeyClient` for the spec's leaf, host and notification transport."""
    from bk_blocks.client import BranchKeyClient
    from bk_blocks.credentials import BranchKeyCredentials

    credentials = BranchKeyCredentials.from_platform_json(
        spec["leaf"], host=spec["host"], notification_transport=spec.get("transport", WEBSOCKET),
        amqp_host="127.0.0.1", read_timeout_s=600.0,
    )
    return BranchKeyClient(credentials)


def auth_headers(leaf: dict[str, str]) -> dict[str, str]:
    """The headers the official clients send (2.x adds `LEAF` only on the run call)."""
    return {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}", "accept": "application/json"}


def requests_upload(host: str, leaf: dict[str, str], path: Path) -> str:
    """Upload as the official clients do: `files=` with an open file, which requests reads whole."""
    with open(path, "rb") as handle:
        response = requests.post(
            f"{host}/api/v1/file/upload", headers=auth_headers(leaf), timeout=600, files={"file": handle},
            data={"data": json.dumps({"leaf_name": leaf["name"], "metadata": V2_METADATA})},
        )
    if response.status_code != 201:
        raise RuntimeError(f"requests upload refused ({response.status_code}): {response.text[:300]}")
    return response.json()["data"]["file_id"]


def requests_download(host: str, leaf: dict[str, str], file_id: str, dest_dir: Path) -> Path:
    """Download as the official clients do: both steps, `response.content` in memory, then written."""
    link = requests.get(f"{host}/api/v1/file/download/{file_id}", headers=auth_headers(leaf) | {"accept": "*/*"},
                        timeout=60)
    if link.status_code != 200:
        raise RuntimeError(f"download link refused ({link.status_code}): {link.text[:300]}")
    response = requests.get(link.json()["data"]["download_url"], timeout=600)
    if response.status_code != 200 or len(response.content) == 0:
        raise RuntimeError(f"download failed ({response.status_code})")
    target = dest_dir / f"{file_id}.npz"
    with open(target, "wb") as handle:
        handle.write(response.content)
    return target


def transfer_call(spec: dict[str, Any]) -> Callable[[], Any]:
    """The one call a transfer child times, with everything it needs prepared (client, paths)."""
    client_kind, direction, host, leaf = spec["client"], spec["direction"], spec["host"], spec["leaf"]
    if client_kind == BK_BLOCKS:
        client = make_client(spec)
        if direction == "upload":
            return lambda: client.upload(spec["path"])
        return lambda: client.download(spec["file_id"], spec["dest_dir"])
    if direction == "upload":
        return lambda: requests_upload(host, leaf, Path(spec["path"]))
    return lambda: requests_download(host, leaf, spec["file_id"], Path(spec["dest_dir"]))


def latency_run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Warm-up plus K rounds of mark, upload, wait; the local times each notice arrived and was returned."""
    from bk_blocks.archive import write_update

    rng = np.random.default_rng(0)
    path = write_update(Path(spec["workdir"]) / f"tiny-{spec['transport']}.npz", 1.0,
                        [rng.standard_normal((8, 4), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)])
    rounds: list[dict[str, Any]] = []
    with make_client(spec) as client:
        client.listen()
        for index in range(spec["warmup"] + spec["rounds"]):
            mark = client.mark()
            client.upload(path)
            notice = client.wait_for_aggregation(NOTICE_TIMEOUT_S, after=mark)
            returned_at = time.time()
            rounds.append({"aggregation_id": notice.aggregation_id, "returned_at": returned_at,
                           "received_at": notice.received_at, "warmup": index < spec["warmup"]})
    path.unlink(missing_ok=True)
    return rounds


def child_main(spec_json: str) -> None:
    """Do one job described by a JSON spec and print its JSON result on stdout."""
    spec = json.loads(spec_json)
    task = spec["task"]
    if task == "make":
        answer: Any = {"bytes": write_archive(Path(spec["path"]), spec["size_mb"], spec["layers"], spec["seed"])}
    elif task == "transfer":
        result, answer = measure(transfer_call(spec))
        answer["result"] = str(result)
    elif task == "latency":
        answer = latency_run(spec)
    else:
        raise ValueError(f"unknown task {task!r}")
    print(json.dumps(answer), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side: servers, federations and orchestration (kept small: children inherit its peak).
# ---------------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """Report progress on stderr, so stdout holds only the tables (or JSON)."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_available() -> bool:
    """Whether RabbitMQ answers on 5672 and its management API on 15672."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            pass
        return requests.get(f"{RABBIT_ADMIN}/api/overview", auth=RABBIT_AUTH, timeout=2).ok
    except (OSError, requests.RequestException):
        return False


@dataclass
class Server:
    """One `bk-server serve` subprocess on a free port, with its admin API."""

    data_dir: Path
    amqp_url: str | None = None
    max_upload_bytes: int = 4 * 1024**3
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    leaves: list[dict[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self) -> Server:
        """Start the server and wait until /healthz answers."""
        command = [sys.executable, "-m", "bk_server.cli", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--log-level", "warning",
                   "--max-upload-bytes", str(self.max_upload_bytes),
                   "--max-decompressed-bytes", str(2 * self.max_upload_bytes)]
        if self.amqp_url:
            command += ["--amqp-url", self.amqp_url]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bk-server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"bk-server did not answer /healthz within {SERVER_START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the admin API with the token the server wrote into its data dir."""
        token = json.loads((self.data_dir / "admin.json").read_text())["admin_token"]
        response = requests.request(method, f"{self.url}/admin/v1{path}", json=body, timeout=60,
                                    headers={"Authorization": f"Bearer {token}"})
        if response.status_code >= 400:
            raise RuntimeError(f"admin {method} {path} refused ({response.status_code}): {response.text[:300]}")
        return response.json()["data"]

    def one_leaf_federation(self, name: str) -> dict[str, str]:
        """A federation of one leaf whose every upload closes a round; return the leaf's credentials."""
        data = self.admin("POST", "/federations", {"leaves": 1, "min_updates": 1, "tree": name, "branch": name})
        leaf = data["leaves"][0]
        self.leaves.append(leaf)
        return leaf

    def rounds(self, branch_id: str) -> list[dict[str, Any]]:
        return self.admin("GET", f"/branches/{branch_id}")["rounds"]

    def wait_for_round(self, branch_id: str, round_number: int) -> dict[str, Any]:
        """Poll the admin API until a round is aggregated; return it."""
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while time.monotonic() < deadline:
            for r in self.rounds(branch_id):
                if r["round"] == round_number and r["status"] == "aggregated":
                    return r
                if r["round"] == round_number and r["status"] == "failed":
                    raise RuntimeError(f"aggregation of round {round_number} failed:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"round {round_number} of {branch_id} not aggregated within {ROUND_TIMEOUT_S:.0f} s")

    def cleanup_broker(self) -> None:
        """Remove the vhosts and users this server provisioned on RabbitMQ for its federations."""
        if not self.amqp_url:
            return
        for leaf in self.leaves:
            for path in (f"vhosts/{leaf['tree_id']}", f"users/{leaf['id']}"):
                try:
                    response = requests.delete(f"{RABBIT_ADMIN}/api/{path}", auth=RABBIT_AUTH, timeout=10)
                except requests.RequestException as exc:
                    progress(f"warning: could not remove {path} from RabbitMQ: {exc}")
                    continue
                if response.status_code not in (204, 404):
                    progress(f"warning: RabbitMQ refused to remove {path}: {response.status_code}")


def run_child(spec: dict[str, Any]) -> Any:
    """Run one job in a fresh interpreter and return its JSON answer."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    completed = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"child {spec['task']} failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def timed_transfer(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One timed upload or download in a child; warn when its baseline may understate the peak."""
    progress(f"  {label}")
    stats = run_child({"task": "transfer", **spec})
    if stats["inherited_peak"] > INHERITED_PEAK_WARNING:
        progress(f"  warning: the child's peak RSS was already {stats['inherited_peak'] / MB:.0f} MB above its "
                 "current RSS before the call; its increase may be understated")
    return stats


def bench_size(server: Server, size_mb: float, work: Path, args: argparse.Namespace) -> list[TransferRow]:
    """Both clients for one archive size: upload, wait for the round's aggregate, download it."""
    progress(f"[{size_mb:g} MB] writing the archive")
    archive = work / f"update-{size_mb:g}MB.npz"
    nbytes = run_child({"task": "make", "path": str(archive), "size_mb": size_mb, "layers": args.layers,
                        "seed": args.seed})["bytes"]
    leaf = server.one_leaf_federation(f"transfer-{size_mb:g}mb")
    downloads = work / "downloads"
    rows = []
    for round_number, client in enumerate((BK_BLOCKS, REQUESTS), start=1):
        common = {"client": client, "host": server.url, "leaf": leaf}
        downloads.mkdir(exist_ok=True)
        up = timed_transfer(f"{client} upload", {**common, "direction": "upload", "path": str(archive)})
        aggregate = server.wait_for_round(leaf["branch_id"], round_number)
        down = timed_transfer(f"{client} download", {**common, "direction": "download",
                                                      "file_id": aggregate["aggregation_id"],
                                                      "dest_dir": str(downloads)})
        received = Path(down["result"]).stat().st_size
        shutil.rmtree(downloads)
        rows.append(TransferRow(
            client=client, size_mb=size_mb, archive_mb=round(nbytes / MB, 1),
            upload_mb_s=round(nbytes / MB / up["seconds"], 1),
            download_mb_s=round(received / MB / down["seconds"], 1),
            upload_rss_mb=round(up["peak_increase"] / MB, 1),
            download_rss_mb=round(down["peak_increase"] / MB, 1),
        ))
    archive.unlink()
    return rows


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def bench_latency(server: Server, transport: str, work: Path, args: argparse.Namespace) -> LatencyRow:
    """K rounds over one transport; latency from the server's `aggregated_at` to the local return."""
    progress(f"[latency] {transport}: 1 warm-up + {args.rounds} rounds")
    leaf = server.one_leaf_federation(f"latency-{transport}")
    rounds = run_child({"task": "latency", "transport": transport, "host": server.url, "leaf": leaf,
                        "workdir": str(work), "rounds": args.rounds, "warmup": 1})
    stored = {r["aggregation_id"]: r["aggregated_at"] for r in server.rounds(leaf["branch_id"])
              if r["aggregation_id"] and r["aggregated_at"] is not None}
    measured = [r for r in rounds if not r["warmup"]]
    missing = [r["aggregation_id"] for r in measured if r["aggregation_id"] not in stored]
    if missing:
        raise RuntimeError(f"notices for aggregations the admin API does not list: {missing}")
    returned = [1000 * (r["returned_at"] - stored[r["aggregation_id"]]) for r in measured]
    received = [1000 * (r["received_at"] - stored[r["aggregation_id"]]) for r in measured]
    return LatencyRow(transport=transport, rounds=len(measured), p50_ms=round(percentile(returned, 50), 2),
                      p95_ms=round(percentile(returned, 95), 2), max_ms=round(max(returned), 2),
                      recv_p50_ms=round(percentile(received, 50), 2))


def run_benchmark(root: Path, args: argparse.Namespace) -> tuple[list[TransferRow], list[LatencyRow], list[str]]:
    """Start the servers, measure everything, stop the servers; return the rows and any notes."""
    notes: list[str] = []
    limit = max(4 * 1024**3, int(2 * max(args.sizes) * MB))
    transfer: list[TransferRow] = []
    latency: list[LatencyRow] = []
    server = Server(root / "bk-ws", max_upload_bytes=limit)
    try:
        progress(f"starting bk-server (WebSocket only) on port {server.port}")
        server.start()
        for size_mb in args.sizes:
            transfer += bench_size(server, size_mb, root, args)
        latency.append(bench_latency(server, WEBSOCKET, root, args))
    finally:
        server.stop()
    if not broker_available():
        notes.append("amqp skipped: no RabbitMQ with its management API on 127.0.0.1:5672/15672")
        progress(notes[-1])
        return transfer, latency, notes
    amqp_server = Server(root / "bk-amqp", amqp_url=AMQP_URL)
    try:
        progress(f"starting bk-server (--amqp-url) on port {amqp_server.port}")
        amqp_server.start()
        latency.append(bench_latency(amqp_server, AMQP, root, args))
    finally:
        amqp_server.stop()
        amqp_server.cleanup_broker()
    return transfer, latency, notes


def library_versions() -> str:
    """Versions of the libraries the figures depend on."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("requests", "urllib3", "websockets", "pika", "uvicorn"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def machine_header(args: argparse.Namespace) -> str:
    """Header lines: the machine, the library versions and how the figures were taken."""
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return (
        f"# {platform.machine()}, {os.cpu_count()} CPUs, {ram_gb:.1f} GB RAM; Python {platform.python_version()}, "
        f"{library_versions()}\n"
        "# loopback (client and bk-server on 127.0.0.1, sharing the CPUs), warm page cache (archives just written);"
        " MB = 10**6 bytes\n"
        f"# transfer: float32 archives in {args.layers} layers, one-leaf federations with min_updates=1; "
        "MB/s = archive MB / wall s of the call;\n"
        "#   RSS +MB = client ru_maxrss increase during the call, in a fresh process (baseline after set-up);\n"
        "#   bk_blocks = BranchKeyClient.upload/download (streaming, with its validation, hashing and fsync);"
        " requests = files= / .content as the official clients do\n"
        f"# latency: local time.time() when wait_for_aggregation returned - the round's aggregated_at "
        f"(admin API), after 1 warm-up round; recv = the listener's receive time instead"
    )


def format_table(headings: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Rows as a fixed-width plain-text table, the first column left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in [headings, *cells]) for i in range(len(headings))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headings), rule, *(line(values) for values in cells)])


def transfer_table(rows: Sequence[TransferRow]) -> str:
    headings = ["client", "size MB", "archive MB", "upload MB/s", "download MB/s", "upload RSS +MB",
                "download RSS +MB"]
    cells = [[r.client, f"{r.size_mb:g}", f"{r.archive_mb:.1f}", f"{r.upload_mb_s:.1f}", f"{r.download_mb_s:.1f}",
              f"{r.upload_rss_mb:.1f}", f"{r.download_rss_mb:.1f}"] for r in rows]
    return format_table(headings, cells)


def latency_table(rows: Sequence[LatencyRow]) -> str:
    headings = ["transport", "rounds", "p50 ms", "p95 ms", "max ms", "recv p50 ms"]
    cells = [[r.transport, str(r.rounds), f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}", f"{r.max_ms:.2f}",
              f"{r.recv_p50_ms:.2f}"] for r in rows]
    return format_table(headings, cells)


def parse_sizes(text: str) -> list[float]:
    """Parse a comma-separated list of positive archive sizes in MB, e.g. `10,100,500`."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sizes in MB like 10,100,500, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; `--quick` fills in small sizes and fewer rounds unless they are given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="archive sizes in MB (default 10,100,500; --quick: 10,50)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="latency rounds K per transport (default 30; --quick: 10)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the transfer archives (default 2)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to create the temporary directory (default /tmp)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed for the archives")
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes 10 and 50 MB, 10 rounds")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of tables")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [10.0, 50.0] if args.quick else [10.0, 100.0, 500.0]
    if args.rounds is None:
        args.rounds = 10 if args.quick else 30
    if args.rounds < 1 or args.layers < 1:
        parser.error("--rounds and --layers must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run both benchmarks and print the tables (or JSON)."""
    args = parse_args(argv)
    if args.one is not None:
        child_main(args.one)
        return
    base = args.workdir if args.workdir is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bk-bench-client-", dir=base))
    try:
        transfer, latency, notes = run_benchmark(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"machine": machine_header(args), "transfer": [asdict(r) for r in transfer],
                          "latency": [asdict(r) for r in latency], "notes": notes}, indent=2))
        return
    print(machine_header(args))
    print()
    print(transfer_table(transfer))
    print()
    print(latency_table(latency))
    for note in notes:
        print(f"# {note}")


if __name__ == "__main__":
    main()
