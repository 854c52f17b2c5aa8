"""A large model's round: each leaf's peak memory against the model's size, and where the time goes.

Leaves run as separate processes, each `federated_training` of a participant holding a float32
model of ``--model-mb`` MB in ``--layers`` layers (preallocated, as a real model is): its
training sleeps ``--train-s`` and nudges a few elements, so what the round costs beyond it is
the leaf's own. The participant offers its arrays (`Participant.parameters`): the global model
is loaded into them in place (``--copying`` leaves that out, to compare with a participant that
takes the global model as new arrays). ``--update`` turns on an update transform (``dp``: clipping
and Gaussian noise; ``float16``: a half-precision upload), to state its peak beside the default's.

Reported: each leaf process's peak RSS (``ru_maxrss``) and its ratio to the model, bk-server's
peak RSS (``VmHWM``), and per measured round (round 1 is a warm-up) the p50 of the steps and the
upload and download rates. MB is 10**6 bytes.

    .venv/bin/python bench/large_model.py                       # 1 GB, 3 leaves, 3 rounds
    .venv/bin/python bench/large_model.py --model-mb 4000 --leaves 2 --rounds 2
    .venv/bin/python bench/large_model.py --update dp            # the same with DP on
    .venv/bin/python bench/large_model.py --quick --json        # 50 MB, a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from harness import format_table, layer_shapes, machine_summary, percentile, progress, temporary_root
from leaf_processes import add_leaf_run_options, leaf_federation

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.participant import Participant, TrainResult
from prefect_branchkey.flows.updates.privacy import PrivacySettings
from prefect_branchkey.flows.updates.transforms import UpdateSettings

MB = 1e6
TIMEOUT_S = 3600
UPDATES = {
    "default": (UpdateSettings(), PrivacySettings()),
    "dp": (UpdateSettings(), PrivacySettings(clip_norm=10.0, noise_multiplier=1e-3)),
    "float16": (UpdateSettings(upload_precision="float16"), PrivacySettings()),
}
STEPS = ("train_s", "upload_s", "wait_s", "download_s", "evaluate_s", "round_s")


class LargeModel(Participant):
    """A preallocated float32 model; training sleeps and nudges one element in 4096."""

    def __init__(self, model_mb: float = 1000, layers: int = 8, train_s: float = 1.0, live: bool = True,
                 leaf_index: int = 0, leaves: int = 1) -> None:
        rng = np.random.default_rng(leaf_index)
        self.layers = [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(model_mb, layers)]
        self.train_s, self.live = train_s, live

    def parameters(self) -> list[np.ndarray] | None:
        return self.layers if self.live else None

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        time.sleep(self.train_s)
        for layer in self.layers:
            layer.reshape(-1)[::4096] += np.float32(1e-3)
        return TrainResult(1.0, self.layers)


def leaf_main(spec: dict[str, Any]) -> None:
    """One leaf process: its rounds, then its peak RSS written beside its work dir."""
    from prefect_branchkey.flows.training import federated_training

    update, privacy = UPDATES[spec["update"]]
    block = BranchKeyCredentials.from_platform_json(spec["credentials"], host=spec["host"], read_timeout_s=600.0)
    results = federated_training(block, f"{LargeModel.__module__}:{LargeModel.__qualname__}", spec["work_dir"],
                                 rounds=spec["rounds"], participant_options=spec["options"],
                                 aggregation_timeout_s=TIMEOUT_S, run_timeout_s=TIMEOUT_S,
                                 update=update, privacy=privacy)
    Path(spec["work_dir"] + ".peak").write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    if [r.status for r in results] != ["completed"] * spec["rounds"]:
        raise SystemExit(f"{block.leaf_name}: rounds ended as {[r.status for r in results]}")


def peak_rss(pid: int) -> int:
    """A live process's peak RSS (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    progress(f"{args.leaves} leaves of a {args.model_mb:.0f} MB model, {args.rounds} rounds")
    with leaf_federation(root, args.leaves, "large") as federation:
        federation.start_leaves(__file__, lambda index: {"rounds": args.rounds, "update": args.update, "options": {
            "model_mb": args.model_mb, "layers": args.layers, "train_s": args.train_s, "live": not args.copying,
            "leaf_index": index, "leaves": args.leaves}})
        federation.wait(TIMEOUT_S * args.rounds)
        server = federation.platform.process
        server_peak = peak_rss(server.pid) if server else 0
        names = federation.names
        rows = [row for name in names for row in history_rows(federation.work_dir(name)) if row["round"] > 1]
        return {
            "model_mb": args.model_mb, "leaves": args.leaves, "rounds": args.rounds, "live": not args.copying,
            "update": args.update,
            "leaf_peak_mb": [int(Path(f"{federation.work_dir(name)}.peak").read_text()) / MB for name in names],
            "server_peak_mb": server_peak / MB,
            "steps_p50_s": {step: percentile([row[step] for row in rows], 50) for step in STEPS},
            "upload_mb_s": percentile([row["bytes_up"] / MB / row["upload_s"] for row in rows], 50),
            "download_mb_s": percentile([row["bytes_down"] / MB / row["download_s"] for row in rows], 50),
        }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-mb", type=float, default=1000.0)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--leaves", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the first a warm-up (3)")
    parser.add_argument("--train-s", type=float, default=1.0)
    parser.add_argument("--copying", action="store_true", help="a participant that offers no arrays")
    parser.add_argument("--update", choices=sorted(UPDATES), default="default",
                        help="the update transform: default (none), dp, or float16 (a half-precision upload)")
    parser.add_argument("--quick", action="store_true", help="a 50 MB model, 2 leaves, 2 rounds")
    add_leaf_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.model_mb, args.leaves, args.rounds, args.layers = 50.0, 2, 2, 4
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.leaf:
        leaf_main(json.loads(args.leaf))
        return
    with temporary_root(args.workdir, "bk-bench-large-") as root:
        report = bench(root, args)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(machine_summary("numpy", "prefect"))
    model = report["model_mb"]
    print(f"# {report['leaves']} leaves as processes, a {model:.0f} MB float32 model, {report['rounds']} rounds "
          f"(round 1 a warm-up); the participant {'offers' if report['live'] else 'does not offer'} its arrays; "
          f"update transform: {report['update']}")
    print(format_table(["leaf", "peak RSS", "x model", "target (1.3x + 200 MB)"], [
        [str(i + 1), f"{peak:.0f} MB", f"{peak / model:.2f}", f"{1.3 * model + 200:.0f} MB"]
        for i, peak in enumerate(report["leaf_peak_mb"])]))
    print(f"bk-server peak RSS {report['server_peak_mb']:.0f} MB")
    print(format_table(["step", "p50 s"], [[step, f"{value:.2f}"] for step, value in report["steps_p50_s"].items()]))
    print(f"upload {report['upload_mb_s']:.0f} MB/s, download {report['download_mb_s']:.0f} MB/s (p50)")


if __name__ == "__main__":
    main()
