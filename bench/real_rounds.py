"""A realistic workload: a real PyTorch CNN trained for about a minute per round with every core
busy, three leaves as separate processes each running `federated_training`, against a real
bk-server and a Prefect server on the embedded PostgreSQL.

Each leaf trains `CNN` (convolutions and a wide dense layer: tens of MB of float32) on its own
synthetic image set, with `torch.set_num_threads(cores)`: the round's other work (the
notification listener, publication, the Prefect run's logs and events) runs beside a saturated
CPU. The participant offers its tensors' memory (`parameters()`), so each global model is loaded
into the model in place.

Per round, from the leaves' histories and the Prefect API: ``overhead`` = the round's wall time
minus the participant's training, and its share of the round; ``visible`` = from the round's end
(its history row) to its history artifact's version in Prefect; and over the run, ``events`` per
leaf-round (every event the Prefect server stored about the leaves), the flow runs' heartbeats
(every `--heartbeat-s`, Prefect's shortest being 30 s) and the longest gap between two of them
(a starved process would stretch it past the window, and Prefect would take the run for crashed),
the notification connections each leaf opened (1: its keepalives, every `--keepalive-s`, were
answered all along), and the count of ERROR and WARNING lines and tracebacks in every process's
log (must be 0).

Run from the project root (the full profile takes several minutes; `--quick` is one round whose
training saturates the cores for longer than the heartbeat window, with 1 s keepalives, as
`make test` runs it):

    .venv/bin/python bench/real_rounds.py
    .venv/bin/python bench/real_rounds.py --quick --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
from harness import format_table, machine_summary, percentile, progress, temporary_root
from leaf_processes import add_leaf_run_options, leaf_federation

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.participant import Participant, TrainResult
from prefect_branchkey.flows.publishing.observability import artifact_key

PROJECT = Path(__file__).resolve().parents[1]
ROUND_TIMEOUT_S = 1800
BAD_LINE = re.compile(r"\b(ERROR|WARNING|CRITICAL)\b|Traceback \(most recent call last\)")


class CNN(Participant):
    """A small convolutional network on synthetic 32x32 images of 10 classes, trained for
    `train_s` seconds a round with every core; `width` scales its dense layer (tens of MB)."""

    metrics: ClassVar[dict[str, str]] = {"accuracy": "max"}

    def __init__(self, train_s: float = 60.0, width: int = 1024, leaf_index: int = 0, leaves: int = 3) -> None:
        import torch

        torch.manual_seed(leaf_index)
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch, self.train_s = torch, float(train_s)
        nn = torch.nn
        self.model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, width), nn.ReLU(), nn.Linear(width, 10))
        generator = torch.Generator().manual_seed(100 + leaf_index)
        self.images = torch.randn(2048, 3, 32, 32, generator=generator)
        self.labels = (self.images.mean(dim=(1, 2, 3)) * 40).long().clamp(-5, 4) + 5
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.live = [tensor.numpy() for tensor in self.model.state_dict().values()]

    def parameters(self) -> list[np.ndarray]:
        return self.live

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        started, steps = time.perf_counter(), 0
        self.model.train()
        while time.perf_counter() - started < self.train_s:
            batch = slice((steps * 64) % 2048, (steps * 64) % 2048 + 64)
            self.optimizer.zero_grad()
            loss = self.torch.nn.functional.cross_entropy(self.model(self.images[batch]), self.labels[batch])
            loss.backward()
            self.optimizer.step()
            steps += 1
        return TrainResult(2048.0, self.live, {"participant_s": time.perf_counter() - started, "steps": steps})

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        self.model.eval()
        with self.torch.no_grad():
            predicted = self.model(self.images[:512]).argmax(dim=1)
        return {"accuracy": float((predicted == self.labels[:512]).float().mean())}


def leaf_main(spec: dict[str, Any]) -> None:
    """One leaf process: `federated_training` of the CNN for every round, the package's own log
    lines (each notification connection among them) on stderr from INFO up."""
    from prefect_branchkey.flows.training import federated_training

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s"))
    package_log = logging.getLogger("prefect_branchkey")
    package_log.setLevel(logging.INFO)
    package_log.addHandler(handler)
    package_log.propagate = False

    block = BranchKeyCredentials.from_platform_json(spec["credentials"], host=spec["host"], read_timeout_s=600.0,
                                                    keepalive_s=spec["keepalive_s"])
    results = federated_training(block, f"{CNN.__module__}:{CNN.__qualname__}", spec["work_dir"],
                                 rounds=spec["rounds"], participant_options=spec["options"],
                                 aggregation_timeout_s=ROUND_TIMEOUT_S, run_timeout_s=ROUND_TIMEOUT_S)
    statuses = [r.status for r in results]
    if statuses != ["completed"] * spec["rounds"]:
        raise SystemExit(f"{block.leaf_name}: rounds ended as {statuses}")


def api(base: str, path: str, body: Any) -> Any:
    response = httpx.post(f"{base}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def visible_after(base: str, leaf: str, rows: list[dict[str, Any]]) -> list[float]:
    """Per round, seconds from its history row's end to its history artifact's version in Prefect."""
    versions = api(base, "/artifacts/filter", {"artifacts": {"key": {"any_": [artifact_key("history", leaf)]}},
                                               "sort": "CREATED_DESC", "limit": 200})
    created = sorted(datetime.fromisoformat(v["created"]) for v in versions)
    if len(created) != len(rows):
        raise RuntimeError(f"{leaf}: {len(created)} versions of its history artifact for {len(rows)} rounds")
    return [(made - row["finished_at"]).total_seconds() for made, row in zip(created, rows, strict=True)]


def stored_events(base: str, since: datetime) -> int:
    """Every event the Prefect server stored since `since` (round, asset, run and task events)."""
    until = datetime.now(UTC) + timedelta(minutes=1)
    counts = api(base, "/events/count-by/event", {"filter": {"occurred": {
        "since": since.isoformat(), "until": until.isoformat()}}, "time_unit": "hour"})
    return sum(c["count"] for c in counts)


def heartbeat_gaps(base: str, since: datetime) -> dict[str, list[float]]:
    """Per flow run, the seconds between its consecutive heartbeat events since `since`."""
    body: dict[str, Any] = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]}, "occurred": {
        "since": since.isoformat(), "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}}, "limit": 50}
    page, beats = api(base, "/events/filter", body), defaultdict(list)
    while True:
        for event in page["events"]:
            beats[event["resource"]["prefect.resource.id"]].append(datetime.fromisoformat(event["occurred"]))
        if not page.get("next_page"):
            break
        page = httpx.get(page["next_page"], timeout=30).json()
    return {run: [(b - a).total_seconds() for a, b in itertools.pairwise(sorted(times))]
            for run, times in beats.items()}


def connections_opened(log: Path) -> int:
    """How many notification connections a leaf's process opened (its log says each one)."""
    return log.read_text(errors="replace").count("listening for notifications")


def bad_lines(logs: Sequence[Path]) -> dict[str, int]:
    """ERROR, WARNING and traceback lines per process log (the first ones said on stderr)."""
    found = {}
    for path in logs:
        text = path.read_text(errors="replace") if path.exists() else ""
        lines = [line for line in text.splitlines() if BAD_LINE.search(line)]
        found[path.name] = len(lines)
        for line in lines[:10]:
            progress(f"{path.name}: {line}")
    return found


def bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    progress("starting the Prefect server (embedded PostgreSQL) and bk-server")
    with leaf_federation(root, args.leaves, "real-rounds") as federation:
        names, api_url = federation.names, federation.prefect.api_url
        started, began = time.monotonic(), datetime.now(UTC) - timedelta(minutes=1)
        federation.start_leaves(__file__, lambda index: {"rounds": args.rounds, "keepalive_s": args.keepalive_s,
                                                         "options": {"train_s": args.train_s, "width": args.width,
                                                                     "leaf_index": index, "leaves": args.leaves}},
                                env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(args.heartbeat_s)})
        federation.wait(ROUND_TIMEOUT_S * args.rounds)
        wall = time.monotonic() - started
        time.sleep(3)
        histories = {name: history_rows(federation.work_dir(name)) for name in names}
        rounds = []
        for number in range(1, args.rounds + 1):
            rows = [next(r for r in histories[n] if r["round"] == number) for n in names]
            overheads = [r["round_s"] - r["train_metrics"]["participant_s"] for r in rows]
            rounds.append({"round": number, "round_s": percentile([r["round_s"] for r in rows], 50),
                           "overhead_s": percentile(overheads, 50),
                           "overhead_share": percentile([o / r["round_s"] for o, r in zip(overheads, rows,
                                                                                             strict=True)], 50),
                           "accuracy": percentile([r["eval_metrics"]["accuracy"] for r in rows], 50)})
        visible = [v for n in names for v in visible_after(api_url, n, histories[n])]
        logs = [*(federation.log(n) for n in names), federation.platform.log_path, federation.prefect.log_path]
        gaps = heartbeat_gaps(api_url, began)
        return {"heartbeat_runs": len(gaps), "heartbeats": sum(len(g) + 1 for g in gaps.values()),
                "heartbeat_max_gap_s": max((g for run in gaps.values() for g in run), default=None),
                "connections": {n: connections_opened(federation.log(n)) for n in names},
                "rounds": rounds, "wall_s": wall, "visible_p50_s": percentile(visible, 50),
                "model_mb": sum(layer.nbytes for layer in CNN(0, args.width).parameters()) / 1e6,
                "visible_max_s": max(visible), "bad_lines": bad_lines(logs),
                "events_per_leaf_round": stored_events(api_url, began) / (args.leaves * args.rounds)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-s", type=float, default=60.0, help="training per round, every core busy (60)")
    parser.add_argument("--width", type=int, default=4096,
                        help="the dense layer's width: 4096 makes a 67 MB model (17M parameters)")
    parser.add_argument("--leaves", type=int, default=3)
    parser.add_argument("--heartbeat-s", type=int, default=30, help="the flow runs' heartbeat interval (30)")
    parser.add_argument("--keepalive-s", type=float, default=20.0, help="the notification keepalive (20)")
    parser.add_argument("--quick", action="store_true",
                        help="1 round of 40 s training (past the heartbeat window), a narrower model, 1 s keepalives")
    add_leaf_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.train_s, args.width, args.keepalive_s = 1, 40.0, 512, 1.0
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.leaf:
        leaf_main(json.loads(args.leaf))
        return
    with temporary_root(args.workdir, "bk-bench-real-") as root:
        report = bench(root, args)
    clean = sum(report["bad_lines"].values()) == 0 and set(report["connections"].values()) == {1}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(machine_summary("torch", "prefect"))
        print(f"# {args.leaves} leaves as processes, a {report['model_mb']:.0f} MB CNN trained {args.train_s:.0f} s a "
              f"round with {os.cpu_count()} threads each; {args.rounds} rounds in {report['wall_s']:.0f} s")
        print(format_table(["round", "round s", "overhead s", "overhead share", "accuracy"], [
            [str(r["round"]), f"{r['round_s']:.1f}", f"{r['overhead_s']:.2f}", f"{100 * r['overhead_share']:.1f} %",
             f"{r['accuracy']:.3f}"] for r in report["rounds"]]))
        print(f"round end to its artifact in Prefect: p50 {report['visible_p50_s']:.2f} s, max "
              f"{report['visible_max_s']:.2f} s; events per leaf-round {report['events_per_leaf_round']:.1f}")
        gap = report["heartbeat_max_gap_s"]
        print(f"heartbeats: {report['heartbeats']} from {report['heartbeat_runs']} flow runs, every "
              f"{args.heartbeat_s} s; longest gap {'-' if gap is None else f'{gap:.1f} s'}; "
              "notification connections per leaf: " + ", ".join(f"{k} {v}" for k, v in report["connections"].items()))
        print("ERROR/WARNING/traceback lines: " + ", ".join(f"{k} {v}" for k, v in report["bad_lines"].items()))
    if not clean:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
