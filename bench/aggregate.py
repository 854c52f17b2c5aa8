"""Benchmark FedAvg over BranchKey `.npz` updates: streaming `fedavg` against a Flower-style baseline.

For each number of updates N (default 2, 10, 50) of a float32 model (default ~100 MB in 4 layers)
it reports wall time, input throughput and peak RSS increase of five methods:

- ``fedavg-stored``: `prefect_branchkey.bk_server.fedavg.fedavg` over uncompressed archives (`write_update`'s default);
- ``fedavg-deflated``: the same over compressed archives (by default only for N <= 10);
- ``in-memory``: the same chunked float64 accumulation over arrays already in memory (compute rate);
- ``naive-flower``: what Flower's `aggregate` does: load every update whole, scale each layer by
  its raw weighting, add the scaled layers up and divide by the total weight;
- ``read-floor``: read the uncompressed archives' bytes once into a reused buffer (the I/O floor).

Every measurement runs in a fresh interpreter (this script with the hidden ``--one`` argument) and
reports ``ru_maxrss`` after the call minus its value just before it, inputs already prepared. Update
files are written once per (N, compression) with a seeded RNG and reused across methods; nothing is
dropped from the page cache, so figures are warm-cache. Each N's `fedavg` and in-memory results are
checked against the naive result. MB and GB are 10**6 and 10**9 bytes.

Run from the project root:

    .venv/bin/python bench/aggregate.py --quick     # 10 MB model, N in {2, 10}: a smoke run
    .venv/bin/python bench/aggregate.py             # 100 MB model, N in {2, 10, 50}: several minutes
    .venv/bin/python bench/aggregate.py --model-mb 50 --leaves 2,20 --compressed-max-n 0 --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    GB,
    MB,
    add_common_options,
    answer_child,
    format_table,
    machine_summary,
    measure,
    progress,
    run_child,
    run_measurement,
    temporary_root,
)

from prefect_branchkey.bk_blocks.archive import DEFAULT_CHUNK_BYTES, write_update
from prefect_branchkey.bk_server.fedavg import WeightedUpdate, fedavg, normalised_weights

STORED, DEFLATED = "stored", "deflated"
FEDAVG_STORED, FEDAVG_DEFLATED = "fedavg-stored", "fedavg-deflated"
IN_MEMORY, NAIVE, FLOOR = "in-memory", "naive-flower", "read-floor"
CHECKED_METHODS = (FEDAVG_STORED, FEDAVG_DEFLATED, IN_MEMORY)
RTOL = 1e-5
# Absolute tolerance as a fraction of a layer's largest magnitude: the naive baseline sums in
# float32, so near-zero elements carry an absolute error of a few float32 ulps of the sum's scale.
ATOL_SCALE = 1e-6


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    method: str
    n: int
    model_mb: float
    input_gb: float
    seconds: float
    gb_per_s: float
    peak_rss_mb: float
    check: str


# ---------------------------------------------------------------------------------------------
# Data: the model's layer shapes and the update archives.
# ---------------------------------------------------------------------------------------------


def model_shapes(model_mb: float, layers: int) -> list[tuple[int, ...]]:
    """Layer shapes of a float32 model of `model_mb` MB: larger layers first, 2-D then a 1-D last."""
    total = max(layers, round(model_mb * MB / 4))
    share = np.arange(layers, 0, -1, dtype=np.float64)
    counts = np.floor(total * share / share.sum()).astype(np.int64)
    shapes: list[tuple[int, ...]] = []
    used = 0
    for count in counts[:-1]:
        cols = min(1000, max(1, int(count)))
        rows = max(1, int(count) // cols)
        shapes.append((rows, cols))
        used += rows * cols
    shapes.append((total - used,))
    return shapes


def make_updates(
    directory: Path, n: int, shapes: Sequence[tuple[int, ...]], compress: bool, seed: int
) -> None:
    """Write `n` distinct random updates into `directory`, plus a manifest of paths and weightings."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        weighting = float(rng.integers(100, 10_000))
        layers = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
        path = write_update(directory / f"update_{index:03d}.npz", weighting, layers, compress=compress)
        entries.append({"path": str(path), "weighting": weighting})
        del layers
    (directory / "manifest.json").write_text(json.dumps(entries))


def load_manifest(directory: Path) -> list[WeightedUpdate]:
    """The updates of a dataset directory, as `fedavg` takes them."""
    entries = json.loads((directory / "manifest.json").read_text())
    return [WeightedUpdate(Path(entry["path"]), float(entry["weighting"])) for entry in entries]


def load_update(path: Path) -> tuple[list[np.ndarray], float]:
    """Load a whole update with `np.load`: its layers in order and its weighting."""
    with np.load(path) as archive:
        count = sum(1 for name in archive.files if name.startswith("layer_"))
        layers = [archive[f"layer_{index}"] for index in range(count)]
        return layers, float(archive["weighting"][0])


def save_layers(path: Path, layers: Sequence[np.ndarray]) -> None:
    """Save result layers as `layer_<i>` members of an uncompressed `.npz`."""
    np.savez(path, **{f"layer_{index}": layer for index, layer in enumerate(layers)})


# ---------------------------------------------------------------------------------------------
# The methods measured (besides `fedavg` itself).
# ---------------------------------------------------------------------------------------------


def naive_flower_average(paths: Sequence[Path]) -> list[np.ndarray]:
    """Flower-style FedAvg: load every update, scale each layer by its raw weight, add up, divide."""
    results = [load_update(path) for path in paths]
    total_weight = sum(weighting for _, weighting in results)
    weighted = [[layer * weighting for layer in layers] for layers, weighting in results]
    return [reduce(np.add, layer_updates) / total_weight for layer_updates in zip(*weighted, strict=False)]


def in_memory_average(
    updates: Sequence[Sequence[np.ndarray]], coefficients: np.ndarray, chunk_bytes: int
) -> list[np.ndarray]:
    """Streaming FedAvg over in-memory layers: one float64 chunk accumulates each element range."""
    acc = np.empty(max(1, chunk_bytes // 8), dtype=np.float64)
    scratch = np.empty_like(acc)
    averaged = []
    for layer_index, reference in enumerate(updates[0]):
        flats = [np.ravel(update[layer_index]) for update in updates]
        out = np.empty(reference.size, dtype=reference.dtype)
        for start in range(0, out.size, acc.size):
            stop = min(start + acc.size, out.size)
            window, tmp = acc[: stop - start], scratch[: stop - start]
            np.multiply(flats[0][start:stop], coefficients[0], out=window)
            for flat, coefficient in zip(flats[1:], coefficients[1:], strict=True):
                np.multiply(flat[start:stop], coefficient, out=tmp)
                window += tmp
            out[start:stop] = window
        averaged.append(out.reshape(reference.shape))
    return averaged


def read_floor(paths: Sequence[Path], chunk_bytes: int) -> int:
    """Read every file once into one reused buffer with `readinto`; return the bytes read."""
    buffer = np.empty(chunk_bytes, dtype=np.uint8)
    view = memoryview(buffer)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while got := handle.readinto(view):
                total += got
    return total


# ---------------------------------------------------------------------------------------------
# Child side: one measurement, or one correctness check, per fresh interpreter.
# ---------------------------------------------------------------------------------------------


def measure_method(spec: dict[str, Any]) -> dict[str, float]:
    """Prepare one method's inputs, measure the method, and save its result (untimed) if asked."""
    method, chunk_bytes = spec["method"], int(spec["chunk_bytes"])
    updates = load_manifest(Path(spec["dataset"]))
    paths = [update.path for update in updates]
    out = Path(spec["out"]) if spec.get("out") else None
    result: list[np.ndarray] | None = None
    if method in (FEDAVG_STORED, FEDAVG_DEFLATED):
        assert out is not None
        _, stats = measure(lambda: fedavg(updates, out, chunk_bytes=chunk_bytes))
    elif method == IN_MEMORY:
        loaded = [load_update(path) for path in paths]
        layers = [update_layers for update_layers, _ in loaded]
        coefficients = normalised_weights([weighting for _, weighting in loaded])
        result, stats = measure(lambda: in_memory_average(layers, coefficients, chunk_bytes))
    elif method == NAIVE:
        result, stats = measure(lambda: naive_flower_average(paths))
    elif method == FLOOR:
        _, stats = measure(lambda: read_floor(paths, chunk_bytes))
    else:
        raise ValueError(f"unknown method {method!r}")
    if result is not None and out is not None:
        save_layers(out, result)
    return stats


def layers_match(result: np.ndarray, reference: np.ndarray) -> bool:
    """Whether a result layer equals the naive one to rtol 1e-5 (atol scaled to the layer)."""
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    if result.shape != reference.shape:
        return False
    return bool(np.allclose(result, reference, rtol=RTOL, atol=ATOL_SCALE * scale))


def check_results(reference_path: Path, results: dict[str, str]) -> dict[str, str]:
    """Compare each method's saved result with the naive one, layer by layer: OK or MISMATCH."""
    verdicts = {}
    with np.load(reference_path) as reference:
        names = sorted(reference.files, key=lambda name: int(name.split("_", 1)[1]))
        for method, path in results.items():
            with np.load(path) as result:
                same = sorted(result.files) == sorted(names) and all(
                    layers_match(result[name], reference[name]) for name in names
                )
            verdicts[method] = "OK" if same else "MISMATCH"
    return verdicts


def make_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Child task `make`: write one (N, compression) dataset."""
    shapes = [tuple(shape) for shape in spec["shapes"]]
    make_updates(Path(spec["dataset"]), int(spec["n"]), shapes, bool(spec["compress"]), int(spec["seed"]))
    return {}


def check_task(spec: dict[str, Any]) -> dict[str, str]:
    """Child task `check`: the verdict of each saved result against the naive one."""
    return check_results(Path(spec["reference"]), spec["results"])


CHILD_TASKS = {"make": make_task, "measure": measure_method, "check": check_task}


# ---------------------------------------------------------------------------------------------
# Parent side: orchestration (kept small: a child's ru_maxrss starts at its parent's peak).
# ---------------------------------------------------------------------------------------------


def make_dataset(root: Path, n: int, kind: str, args: argparse.Namespace) -> Path:
    """Write the N updates of one (N, compression) pair in a child process; return their directory."""
    directory = root / f"n{n}-{kind}"
    progress(f"[N={n}] writing {n} {kind} updates of {args.model_mb:g} MB")
    started = time.perf_counter()
    run_child(
        __file__,
        {
            "task": "make",
            "dataset": str(directory),
            "n": n,
            "shapes": model_shapes(args.model_mb, args.layers),
            "compress": kind == DEFLATED,
            "seed": args.seed,
        }
    )
    progress(f"[N={n}]   written in {time.perf_counter() - started:.1f} s")
    return directory


def measure_row(method: str, n: int, dataset: Path, out: Path | None, args: argparse.Namespace) -> Row:
    """Measure one method for one N in a child process and turn its answer into a table row."""
    progress(f"[N={n}] {method}")
    stats = run_measurement(
        __file__,
        {
            "task": "measure",
            "method": method,
            "dataset": str(dataset),
            "out": str(out) if out else None,
            "chunk_bytes": int(args.chunk_mb * MB),
        },
        prefix=f"[N={n}]   ",
    )
    input_gb = n * model_bytes(args) / GB
    return Row(
        method=method,
        n=n,
        model_mb=round(model_bytes(args) / MB, 1),
        input_gb=round(input_gb, 3),
        seconds=round(stats["seconds"], 3),
        gb_per_s=round(input_gb / stats["seconds"], 3),
        peak_rss_mb=round(stats["peak_increase"] / MB, 1),
        check="-",
    )


def model_bytes(args: argparse.Namespace) -> int:
    """The model's size in bytes (float32 elements of all layers)."""
    return 4 * sum(int(np.prod(shape)) for shape in model_shapes(args.model_mb, args.layers))


def bench_leaves(root: Path, n: int, args: argparse.Namespace) -> list[Row]:
    """All methods for one N: write the updates, measure, check against naive, delete the files."""
    work = root / f"n{n}"
    outputs = work / "out"
    outputs.mkdir(parents=True)
    stored = make_dataset(work, n, STORED, args)
    results = {FEDAVG_STORED: outputs / f"{FEDAVG_STORED}.npz", IN_MEMORY: outputs / f"{IN_MEMORY}.npz"}
    rows = [
        measure_row(FLOOR, n, stored, None, args),
        measure_row(FEDAVG_STORED, n, stored, results[FEDAVG_STORED], args),
    ]
    if n <= args.compressed_max_n:
        deflated = make_dataset(work, n, DEFLATED, args)
        results[FEDAVG_DEFLATED] = outputs / f"{FEDAVG_DEFLATED}.npz"
        rows.append(measure_row(FEDAVG_DEFLATED, n, deflated, results[FEDAVG_DEFLATED], args))
        shutil.rmtree(deflated)
    rows.append(measure_row(IN_MEMORY, n, stored, results[IN_MEMORY], args))
    reference = outputs / f"{NAIVE}.npz"
    rows.append(measure_row(NAIVE, n, stored, reference, args))
    progress(f"[N={n}] checking results against {NAIVE}")
    verdicts = run_child(
        __file__,
        {"task": "check", "reference": str(reference), "results": {m: str(p) for m, p in results.items()}}
    )
    shutil.rmtree(work)
    return [
        Row(**{**asdict(row), "check": verdicts.get(row.method, "ref" if row.method == NAIVE else "-")})
        for row in rows
    ]


def machine_header(args: argparse.Namespace) -> str:
    """Header lines: the machine, the library versions and how the figures were taken."""
    shapes = ", ".join("x".join(map(str, shape)) for shape in model_shapes(args.model_mb, args.layers))
    return (
        f"{machine_summary('numpy')}\n"
        f"# float32 model of {model_bytes(args) / MB:.1f} MB in layers {shapes}; "
        f"chunk {int(args.chunk_mb * MB)} bytes\n"
        "# warm page cache (files just written, nothing dropped); input GB = N x model size (decompressed);\n"
        "# peak RSS = ru_maxrss increase during the call, in a fresh process;"
        " in-memory inputs are loaded before the baseline\n"
        f"# check = result vs {NAIVE} with np.allclose(rtol={RTOL:g}, atol={ATOL_SCALE:g} x max|layer|)"
    )


def results_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width plain-text table."""
    headings = ["method", "N", "model MB", "input GB", "wall s", "GB/s", "peak RSS +MB", "check"]
    cells = [
        [row.method, str(row.n), f"{row.model_mb:.1f}", f"{row.input_gb:.2f}", f"{row.seconds:.3f}",
         f"{row.gb_per_s:.2f}", f"{row.peak_rss_mb:.1f}", row.check]
        for row in rows
    ]
    return format_table(headings, cells, left=(0, 7))


def parse_leaves(text: str) -> list[int]:
    """Parse a comma-separated list of positive update counts, e.g. `2,10,50`."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 2,10,50, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; `--quick` fills in a small model and N list unless they are given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-mb", type=float, default=None, help="model size in MB (default 100; 10 with --quick)"
    )
    parser.add_argument(
        "--leaves", type=parse_leaves, default=None, help="update counts N (default 2,10,50; --quick: 2,10)"
    )
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument(
        "--compressed-max-n",
        type=int,
        default=10,
        help="run fedavg-deflated only for N up to this (default 10; 0: never)",
    )
    parser.add_argument(
        "--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / MB, help="chunk size, MB (default: fedavg's)"
    )
    add_common_options(parser, seed_of="updates", quick_help="smoke run: 10 MB model, N in {2, 10}",
                       json_help="print the rows as JSON instead of a table", children=True)
    args = parser.parse_args(argv)
    if args.model_mb is None:
        args.model_mb = 10.0 if args.quick else 100.0
    if args.leaves is None:
        args.leaves = [2, 10] if args.quick else [2, 10, 50]
    if args.layers < 1 or args.model_mb <= 0 or args.chunk_mb <= 0:
        parser.error("--layers, --model-mb and --chunk-mb must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark for every N and print the table (or JSON)."""
    args = parse_args(argv)
    if args.one is not None:
        answer_child(args.one, CHILD_TASKS)
        return
    with temporary_root(args.workdir, "bk-bench-aggregate-") as root:
        rows = [row for n in args.leaves for row in bench_leaves(root, n, args)]
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print(machine_header(args))
        print(results_table(rows))


if __name__ == "__main__":
    main()
