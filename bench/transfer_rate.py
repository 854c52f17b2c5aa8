"""Upload and download MB/s of a large update: our client against plain `requests`, side by side.

One `bk-server serve` process on 127.0.0.1 (started here, its data in a temporary work directory
removed at the end) and one update archive of ``--size-mb`` MB of float32 in ``--layers`` layers,
written with `write_update`. First the uploads, then the downloads: in each direction one untimed
warm-up call by each client (the first transfer after other work costs the process more CPU,
whichever client makes it), then ``--repeats`` timed calls by each, the clients' order rotated
every repeat so that drift (page cache, other work on the machine) hits them alike:

- upload, ours: `BranchKeyClient.upload_update(path)` timed end to end: it validates the archive
  (`inspect_update` reads every layer), hashes it (SHA-256), then streams the multipart body. The
  POST alone is timed too (around the client's session call), so the table shows the transfer and
  the validation and hashing before it apart;
- upload, plain: the same multipart framing, fields and headers (auth, ``x-bk-file-size``,
  ``x-bk-file-digest``, computed before the timer) sent by ``requests.post`` with a body that
  streams the file in 1 MiB blocks and has a length (so requests sends Content-Length);
- download, ours: `BranchKeyClient.download` (link, streamed into a temporary file, fsync,
  structure check, rename);
- download, plain: the same two requests with ``requests``: the link, then ``stream=True`` and
  ``iter_content(1 MiB)`` into a file;
- download, plain + fsync (a reference, not judged): the same, with the file made durable at the
  end as ours is before its rename: what of a gap is the disk's.

Every upload goes to a leaf of its own in a federation whose round never closes (one leaf never
uploads), so each is accepted on its own (201, or the benchmark fails) and none starts an
aggregation while others are timed; the stored file's size is checked against the archive's. The
aggregate downloaded comes from a one-leaf round (min_updates=1), aggregated before the first
timing; each download's SHA-256 is checked against the others'. Before each timed call the disks
are synced (``os.sync``), so no transfer pays for the previous one's dirty pages.

The target (issue "Real rounds"): ours at >= 90 % of plain MB/s in each direction, the upload
judged on its transfer (plain does not validate or hash) and the download end to end. Without
``--quick`` the script exits 1 when a direction misses it (and always when the bytes differ). MB
is 10**6 bytes; MB/s is the archive's MB over the wall seconds of the call (median over the
repeats). Each call's CPU seconds, the client's process (with the kernel's work on its behalf,
such as writing its file to disk) and bk-server's, are reported beside: what each side spent.
Loopback: the client and bk-server share the CPUs and the disk. Progress goes to stderr.

    .venv/bin/python bench/transfer_rate.py                    # 1000 MB, 3 repeats
    .venv/bin/python bench/transfer_rate.py --size-mb 4000 --repeats 2
    .venv/bin/python bench/transfer_rate.py --quick --json     # 50 MB, 1 repeat, no target
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests
from harness import (
    MB,
    BenchServer,
    add_common_options,
    cpu_seconds,
    format_table,
    layer_shapes,
    machine_summary,
    progress,
    temporary_root,
)

from prefect_branchkey.bk_blocks.archive import write_update
from prefect_branchkey.bk_blocks.client import BranchKeyClient, ConnectionOptions, read_platform_credentials

MIB = 1 << 20
TARGET = 0.90
OURS, PLAIN, PLAIN_FSYNC = "ours", "plain", "plain+fsync"
CLIENTS = {"upload": (OURS, PLAIN), "download": (OURS, PLAIN, PLAIN_FSYNC)}
TIMEOUT = (10.0, 600.0)
T = TypeVar("T")


@dataclass(frozen=True)
class Cost:
    """One timed call: wall seconds, and the CPU seconds the client (this process) and bk-server spent."""

    seconds: float
    client_cpu_s: float
    server_cpu_s: float


@dataclass
class Timings:
    """Every timed call's cost, by name, in the order they ran, and what each moved."""

    costs: dict[str, list[Cost]] = field(default_factory=dict)
    stored_bytes: dict[str, list[int]] = field(default_factory=dict)
    downloaded_sha256: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, cost: Cost) -> None:
        self.costs.setdefault(name, []).append(cost)


# ---------------------------------------------------------------------------------------------
# The two clients: the calls that are timed, everything they need prepared before.
# ---------------------------------------------------------------------------------------------


def write_archive(path: Path, size_mb: float, layers: int, seed: int) -> int:
    """A random float32 update of `size_mb` MB written with `write_update`; its size in bytes."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(size_mb, layers)]
    write_update(path, float(rng.integers(100, 10_000)), arrays)
    del arrays
    gc.collect()
    return path.stat().st_size


def our_client(host: str, leaf: dict[str, Any]) -> BranchKeyClient:
    """A `BranchKeyClient` for one leaf, with a read timeout long enough for a large file."""
    identity, token = read_platform_credentials(leaf)
    return BranchKeyClient(identity, token, ConnectionOptions(host=host, read_timeout_s=TIMEOUT[1]))


class PostTimer:
    """Times the POST an upload makes, around the client's session call: the transfer without the
    validation and hashing `upload_update` does before it (a benchmark's look inside the client)."""

    def __init__(self, client: BranchKeyClient, server_pid: int | None) -> None:
        self.cost: Cost | None = None
        session = client._session
        send = session.request

        def timed(method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
            if method != "POST":
                return send(method, url, *args, **kwargs)
            response, self.cost = measured(lambda: send(method, url, *args, **kwargs), server_pid)
            return response

        session.request = timed  # type: ignore[method-assign, assignment]


class StreamedMultipart:
    """A multipart/form-data body as plain `requests` code streams one: the head, the file in 1 MiB
    blocks read as they are sent, the tail; its `len` makes requests send Content-Length."""

    def __init__(self, path: Path, fields: dict[str, str]) -> None:
        self.boundary = uuid.uuid4().hex
        self.path = path
        parts = [f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                 for name, value in fields.items()]
        self.head = ("".join(parts) + f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.file_bytes = path.stat().st_size
        self.sent = 0

    def __len__(self) -> int:
        return len(self.head) + self.file_bytes + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        with open(self.path, "rb") as handle:
            while block := handle.read(MIB):
                self.sent += len(block)
                yield block
        yield self.tail


def plain_headers(leaf: dict[str, Any], accept: str = "application/json") -> dict[str, str]:
    """The auth headers our client sends, written out by hand."""
    return {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}", "accept": accept, "LEAF": "true"}


def plain_upload_call(host: str, leaf: dict[str, Any], path: Path, sha256: bytes) -> Callable[[], str]:
    """Plain requests' upload, prepared (body, headers, digest): the call to time returns the file id."""
    size = path.stat().st_size
    digest = "sha256=" + base64.b64encode(sha256).decode()
    meta = {"client_version": "plain-requests", "file_size": size, "file_digest": digest}
    body = StreamedMultipart(path, {"data": json.dumps({"leaf_name": leaf["name"], "metadata": json.dumps(meta)})})
    headers = plain_headers(leaf) | {"Content-Type": f"multipart/form-data; boundary={body.boundary}",
                                     "x-bk-file-size": str(size), "x-bk-file-digest": digest}

    def upload() -> str:
        response = requests.post(f"{host}/api/v1/file/upload", data=body, headers=headers, timeout=TIMEOUT)
        if response.status_code != 201:
            raise RuntimeError(f"plain upload refused ({response.status_code}): {response.text[:300]}")
        if body.sent != size:
            raise RuntimeError(f"plain upload sent {body.sent} of {size} bytes")
        return str(response.json()["data"]["file_id"])

    return upload


def plain_download(host: str, leaf: dict[str, Any], file_id: str, target: Path, fsync: bool = False) -> int:
    """Plain requests' download: the link, then the file streamed in 1 MiB blocks (with `fsync`,
    made durable at the end, as ours is before its rename); bytes received."""
    with requests.Session() as session:
        link = session.get(f"{host}/api/v1/file/download/{file_id}", headers=plain_headers(leaf, "*/*"),
                           timeout=TIMEOUT)
        if link.status_code != 200:
            raise RuntimeError(f"download link refused ({link.status_code}): {link.text[:300]}")
        received = 0
        with session.get(link.json()["data"]["download_url"], stream=True, timeout=TIMEOUT) as response:
            if response.status_code != 200:
                raise RuntimeError(f"plain download refused ({response.status_code})")
            with open(target, "wb") as handle:
                for block in response.iter_content(chunk_size=MIB):
                    handle.write(block)
                    received += len(block)
                if fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
    return received


def measured(call: Callable[[], T], server_pid: int | None) -> tuple[T, Cost]:
    """Run `call`; its result, wall seconds and the client's and bk-server's CPU seconds."""
    server_cpu, client_cpu, start = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    return result, Cost(seconds, time.process_time() - client_cpu, cpu_seconds(server_pid) - server_cpu)


def timed(call: Callable[[], T], server: BenchServer) -> tuple[T, Cost]:
    """Sync the disks and collect garbage (untimed), then `measured(call)`."""
    os.sync()
    gc.collect()
    return measured(call, server.process.pid if server.process else None)


def sha256_hex(path: Path) -> str:
    """A file's SHA-256 in hex, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(MIB):
            sha.update(block)
    return sha.hexdigest()


# ---------------------------------------------------------------------------------------------
# The timed calls: one upload or download by one client, checked.
# ---------------------------------------------------------------------------------------------


def upload(server: BenchServer, client: str, leaf: dict[str, Any], archive: Path, sha256: bytes,
           timings: Timings) -> None:
    """One timed upload by `client` as `leaf`; the stored file must be the archive's size."""
    if client == OURS:
        ours = our_client(server.url, leaf)
        post = PostTimer(ours, server.process.pid if server.process else None)
        with ours:
            file_id, cost = timed(lambda: ours.upload_update(archive).file_id, server)
        if post.cost is None:
            raise RuntimeError("our upload made no POST")
        timings.add("upload ours post", post.cost)
    else:
        file_id, cost = timed(plain_upload_call(server.url, leaf, archive, sha256), server)
    timings.add(f"upload {client}", cost)
    stored = server.data_dir / "files" / "uploads" / f"{file_id}.npz"
    timings.stored_bytes.setdefault(client, []).append(stored.stat().st_size)
    progress(f"  upload {client}: {archive.stat().st_size / MB / cost.seconds:.1f} MB/s ({cost.seconds:.2f} s)")


def download(server: BenchServer, client: str, leaf: dict[str, Any], file_id: str, dest: Path,
             timings: Timings) -> None:
    """One timed download by `client` into `dest`; its hash is kept, the file removed."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{file_id}.npz"
    if client == OURS:
        with our_client(server.url, leaf) as ours:
            _, cost = timed(lambda: ours.download(file_id, dest), server)
    else:
        _, cost = timed(lambda: plain_download(server.url, leaf, file_id, target, client == PLAIN_FSYNC), server)
    timings.add(f"download {client}", cost)
    timings.downloaded_sha256.setdefault(client, []).append(sha256_hex(target))
    progress(f"  download {client}: {target.stat().st_size / MB / cost.seconds:.1f} MB/s ({cost.seconds:.2f} s)")
    target.unlink()


def aggregate_of(server: BenchServer, archive: Path) -> tuple[dict[str, Any], str]:
    """A one-leaf round (min_updates=1) of `archive`, aggregated: the leaf and the aggregation id."""
    leaf = server.federation("download", leaves=1)["leaves"][0]
    with our_client(server.url, leaf) as client:
        client.upload_update(archive)
    return leaf, str(server.wait_for_round(leaf["branch_id"], 1)["aggregation_id"])


def bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start bk-server, write the archive, then per direction a warm-up call by each client (untimed:
    the first transfer after other work costs the process more CPU, whichever client makes it) and
    the repeats; the report (costs and checks)."""
    limit = max(4 * 1024**3, int(2 * args.size_mb * MB))
    server = BenchServer(root / "bk" / "data", options={"max_upload_bytes": limit,
                                                        "max_decompressed_bytes": 2 * limit})
    load_before = os.getloadavg()
    try:
        progress("starting bk-server")
        server.start()
        archive = root / "update.npz"
        progress(f"writing a {args.size_mb:g} MB archive")
        nbytes = write_archive(archive, args.size_mb, args.layers, args.seed)
        sha256 = bytes.fromhex(sha256_hex(archive))
        progress("aggregating it in a one-leaf round")
        down_leaf, file_id = aggregate_of(server, archive)
        up_leaves = server.federation("upload", leaves=2 * (args.repeats + 1) + 1)["leaves"]
        calls: dict[str, Callable[[str, Timings], None]] = {
            "upload": lambda client, into: upload(server, client, up_leaves.pop(), archive, sha256, into),
            "download": lambda client, into: download(server, client, down_leaf, file_id, root / "downloads", into),
        }
        timings = Timings()
        for direction, call in calls.items():
            progress(f"{direction}: a warm-up by each client, then {args.repeats} repeats")
            clients = CLIENTS[direction]
            for client in clients:
                call(client, Timings())
            for repeat in range(args.repeats):
                turn = repeat % len(clients)
                for client in clients[turn:] + clients[:turn]:
                    call(client, timings)
    finally:
        server.stop()
    return report(args, nbytes, sha256.hex(), timings, load_before, os.getloadavg())


# ---------------------------------------------------------------------------------------------
# Report: rates, ratios, the target, the table.
# ---------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def report(args: argparse.Namespace, nbytes: int, sha256: str, timings: Timings,
           load_before: tuple[float, float, float], load_after: tuple[float, float, float]) -> dict[str, Any]:
    """The figures: each call's costs, MB/s (median over repeats), ours as a share of plain, the checks."""
    costs = timings.costs
    rates = {name: median([nbytes / MB / c.seconds for c in values]) for name, values in costs.items()}
    prepare = [total.seconds - post.seconds
               for total, post in zip(costs["upload ours"], costs["upload ours post"], strict=True)]
    upload_share = rates["upload ours post"] / rates["upload plain"]
    download_share = rates["download ours"] / rates["download plain"]
    hashes = {h for values in timings.downloaded_sha256.values() for h in values}
    stored = {n for values in timings.stored_bytes.values() for n in values}
    return {
        "size_mb": args.size_mb, "archive_bytes": nbytes, "archive_sha256": sha256, "layers": args.layers,
        "repeats": args.repeats, "costs": {name: [asdict(c) for c in values] for name, values in costs.items()},
        "mb_s": rates, "upload_prepare_s": prepare, "upload_share": upload_share,
        "upload_end_to_end_share": rates["upload ours"] / rates["upload plain"], "download_share": download_share,
        "download_share_of_fsync": rates["download ours"] / rates["download plain+fsync"],
        "stored_bytes": timings.stored_bytes, "downloaded_sha256": timings.downloaded_sha256,
        "same_bytes": stored == {nbytes} and len(hashes) == 1,
        "target": None if args.quick else TARGET,
        "target_met": None if args.quick else min(upload_share, download_share) >= TARGET,
        "load_before": load_before, "load_after": load_after,
    }


ROWS = (
    ("upload", "ours, end to end: validate + hash + send", "upload ours", None),
    ("upload", "ours, the POST alone (judged)", "upload ours post", "upload plain"),
    ("upload", "plain requests, streamed body", "upload plain", None),
    ("download", "ours: temp file, fsync, check, rename (judged)", "download ours", "download plain"),
    ("download", "plain requests, iter_content(1 MiB)", "download plain", None),
    ("download", "plain requests + fsync (reference)", "download plain+fsync", None),
)


def table(result: dict[str, Any]) -> str:
    """One line per timed call: MB/s (median, min, max), wall and CPU seconds (median), the judged shares."""
    costs, rates, mb = result["costs"], result["mb_s"], result["archive_bytes"] / MB
    cells = []
    for direction, label, name, against in ROWS:
        per_repeat = [mb / c["seconds"] for c in costs[name]]
        share = rates[name] / rates[against] if against else None
        verdict = "" if share is None or result["target"] is None else "met" if share >= result["target"] else "MISSED"
        cells.append([direction, label, f"{rates[name]:.1f}", f"{min(per_repeat):.1f}", f"{max(per_repeat):.1f}",
                      *(f"{median([c[key] for c in costs[name]]):.2f}"
                        for key in ("seconds", "client_cpu_s", "server_cpu_s")),
                      "" if share is None else f"{share:.1%}", verdict])
    return format_table(["direction", "client", "MB/s p50", "min", "max", "wall s", "client CPU s",
                         "server CPU s", "of plain", ">= 90 %"], cells, left=(0, 1))


def print_report(result: dict[str, Any]) -> None:
    """The machine line, how it was measured, the table and the verdict."""
    before, after = result["load_before"], result["load_after"]
    print(machine_summary("requests", "urllib3", "uvicorn", "numpy"))
    print(f"# {result['archive_bytes'] / MB:.1f} MB archive (float32, {result['layers']} layers), "
          f"{result['repeats']} repeats after a warm-up call per client and direction, the clients' order "
          f"rotated each repeat;\n# loopback, client and bk-server on the same CPUs; load average "
          f"{before[0]:.2f} before, {after[0]:.2f} after")
    print("# MB/s: median over the repeats (min, max); wall and CPU seconds: medians; CPU seconds: the "
          "client's process and bk-server's, during the call")
    print(table(result))
    prepare = median(result["upload_prepare_s"])
    print(f"ours before the POST (validate + hash): {prepare:.2f} s p50; end to end "
          f"{result['upload_end_to_end_share']:.1%} of plain")
    print(f"download: ours {result['download_share_of_fsync']:.1%} of plain requests + fsync (durable as ours is)")
    print(f"same bytes: {'yes' if result['same_bytes'] else 'NO'} (stored uploads {result['stored_bytes']}, "
          f"{sum(len(v) for v in result['downloaded_sha256'].values())} downloads' SHA-256)")
    if result["target"] is not None:
        print("target met: ours >= 90 % of plain in both directions" if result["target_met"]
              else "TARGET MISSED: ours < 90 % of plain in at least one direction")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; `--quick` is 50 MB, one repeat and no target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1000.0, help="archive size in MB (default 1000)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the archive (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed transfers per client and direction (3)")
    add_common_options(parser, seed_of="archive's values", quick_help="smoke run: 50 MB, 1 repeat, no 90 %% target",
                       json_help="print the report as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeats = 50.0, 1
    if args.size_mb <= 0 or args.repeats < 1 or args.layers < 1:
        parser.error("--size-mb, --repeats and --layers must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Measure, print the table (or JSON); exit 1 if the bytes differ or, without --quick, the target is missed."""
    args = parse_args(argv)
    with temporary_root(args.workdir, "bk-bench-transfer-") as root:
        result = bench(root, args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result)
    if not result["same_bytes"] or result["target_met"] is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
