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
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from harness import (
    AMQP,
    AMQP_URL,
    MB,
    WEBSOCKET,
    BenchServer,
    add_common_options,
    answer_child,
    format_table,
    layer_shapes,
    machine_summary,
    measure,
    percentile,
    progress,
    run_child,
    run_measurement,
    size_list,
    temporary_root,
)

from prefect_branchkey.bk_dev.processes import broker_available

BK_BLOCKS, REQUESTS = "bk_blocks", "requests"
# What the official 2.x client sends as metadata (Python-looking text, not JSON).
V2_METADATA = "{'key1':'value1', 'key2':'value2'}"
NOTICE_TIMEOUT_S = 60.0


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


def write_archive(path: Path, size_mb: float, layers: int, seed: int) -> int:
    """Write a random float32 update of `size_mb` MB with `write_update`; return its size in bytes."""
    from prefect_branchkey.bk_blocks.archive import write_update

    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(size_mb, layers)]
    write_update(path, float(rng.integers(100, 10_000)), arrays)
    return path.stat().st_size


def make_client(spec: dict[str, Any]) -> Any:
    """A `BranchKeyClient` for the spec's leaf, host and notification transport."""
    from prefect_branchkey.bk_blocks.client import BranchKeyClient, ConnectionOptions, read_platform_credentials

    identity, token = read_platform_credentials(spec["leaf"])
    options = ConnectionOptions(host=spec["host"], notification_transport=spec.get("transport", WEBSOCKET),
                                amqp_host="127.0.0.1", read_timeout_s=600.0)
    return BranchKeyClient(identity, token, options)


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
    from prefect_branchkey.bk_blocks.archive import write_update

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


def make_task(spec: dict[str, Any]) -> dict[str, int]:
    """Child task `make`: write the archive; answer its size in bytes."""
    return {"bytes": write_archive(Path(spec["path"]), spec["size_mb"], spec["layers"], spec["seed"])}


def transfer_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Child task `transfer`: the measured call's figures and its result (file id or downloaded path)."""
    result, stats = measure(transfer_call(spec))
    return {**stats, "result": str(result)}


CHILD_TASKS = {"make": make_task, "transfer": transfer_task, "latency": latency_run}


# ---------------------------------------------------------------------------------------------
# Parent side: servers, federations and orchestration (kept small: children inherit its peak).
# ---------------------------------------------------------------------------------------------


def timed_transfer(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One timed upload or download in a child; warn when its baseline may understate the peak."""
    progress(f"  {label}")
    return run_measurement(__file__, {"task": "transfer", **spec}, prefix="  ")


def bench_size(server: BenchServer, size_mb: float, work: Path, args: argparse.Namespace) -> list[TransferRow]:
    """Both clients for one archive size: upload, wait for the round's aggregate, download it."""
    progress(f"[{size_mb:g} MB] writing the archive")
    archive = work / f"update-{size_mb:g}MB.npz"
    nbytes = run_child(__file__, {"task": "make", "path": str(archive), "size_mb": size_mb, "layers": args.layers,
                                  "seed": args.seed})["bytes"]
    leaf = server.federation(f"transfer-{size_mb:g}mb", leaves=1)["leaves"][0]
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


def bench_latency(server: BenchServer, transport: str, work: Path, args: argparse.Namespace) -> LatencyRow:
    """K rounds over one transport; latency from the server's `aggregated_at` to the local return."""
    progress(f"[latency] {transport}: 1 warm-up + {args.rounds} rounds")
    leaf = server.federation(f"latency-{transport}", leaves=1)["leaves"][0]
    rounds = run_child(__file__, {"task": "latency", "transport": transport, "host": server.url, "leaf": leaf,
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
    server = BenchServer(root / "bk-ws", options={"max_upload_bytes": limit, "max_decompressed_bytes": 2 * limit})
    try:
        progress("starting bk-server (WebSocket only)")
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
    amqp_server = BenchServer(root / "bk-amqp", amqp_url=AMQP_URL)
    try:
        progress("starting bk-server (--amqp-url)")
        amqp_server.start()
        latency.append(bench_latency(amqp_server, AMQP, root, args))
    finally:
        amqp_server.stop()
        amqp_server.cleanup_broker()
    return transfer, latency, notes


def machine_header(args: argparse.Namespace) -> str:
    """Header lines: the machine, the library versions and how the figures were taken."""
    return (
        f"{machine_summary('requests', 'urllib3', 'websockets', 'pika', 'uvicorn')}\n"
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; `--quick` fills in small sizes and fewer rounds unless they are given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=size_list("10,100,500"), default=None,
                        help="archive sizes in MB (default 10,100,500; --quick: 10,50)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="latency rounds K per transport (default 30; --quick: 10)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the transfer archives (default 2)")
    add_common_options(parser, seed_of="archives", quick_help="smoke run: sizes 10 and 50 MB, 10 rounds",
                       json_help="print the rows as JSON instead of tables", children=True)
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
        answer_child(args.one, CHILD_TASKS)
        return
    with temporary_root(args.workdir, "bk-bench-client-") as root:
        transfer, latency, notes = run_benchmark(root, args)
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
