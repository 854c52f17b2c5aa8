"""What the update transforms change and cost: the digits federation's accuracy and epsilon with
and without differential privacy and at reduced upload precision, and the transforms' time and
memory on a large model beside the upload they precede.

Part 1 runs the digits federation (3 non-IID leaves, `DigitsSoftmax`) round by round in this
process: each leaf trains from the global model, its update goes through
`prefect_branchkey.flows.updates.transforms.prepare_update` (guard, DP, cast) into an archive, and the next global
model is bk-server's own FedAvg (`prefect_branchkey.bk_server.fedavg.fedavg`) of those archives. Prefect and the
network are left out: they change neither accuracy nor epsilon. Part 2 times `prepare_update`
on a float32 model of `--model-mb` MB (peak memory by tracemalloc, which sees numpy's buffers)
and the upload of its archive to a local bk-server over loopback.

    .venv/bin/python bench/update_transforms.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from harness import MB, add_common_options, format_table, layer_shapes, machine_summary, progress, temporary_root

from prefect_branchkey.bk_blocks.archive import read_aggregate, write_update
from prefect_branchkey.bk_blocks.client import BranchKeyClient, ConnectionOptions, read_platform_credentials
from prefect_branchkey.bk_dev.local_platform import LocalServer
from prefect_branchkey.bk_server.fedavg import WeightedUpdate, fedavg
from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.updates.privacy import PrivacyLedger, PrivacySettings
from prefect_branchkey.flows.updates.transforms import UpdatePolicy, delta_norm, prepare_update, read_back

DELTA = 1e-5


@dataclass(frozen=True)
class FederationRow:
    setting: str
    final_accuracy: float
    epsilon: float | None
    bytes_per_update: int


@dataclass(frozen=True)
class CostRow:
    transform: str
    seconds: float
    peak_mb: float
    upload_share: float


def federation_settings(quick: bool) -> dict[str, UpdatePolicy]:
    """The settings part 1 compares: float32 as trained, float16, and DP at two or three noise levels."""
    settings = {
        "float32 (native)": UpdatePolicy(),
        "float16": UpdatePolicy(upload_precision="float16"),
        "DP C=1.0 z=0.1": UpdatePolicy(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=0.1, delta=DELTA)),
        "DP C=1.0 z=0.3": UpdatePolicy(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=0.3, delta=DELTA)),
    }
    if not quick:
        settings["DP C=1.0 z=1.0"] = UpdatePolicy(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=1.0,
                                                                        delta=DELTA))
    return settings


def run_federation(name: str, policy: UpdatePolicy, leaves: int, rounds: int, seed: int, root: Path) -> FederationRow:
    """The digits federation for `rounds` rounds under `policy`; the last round's mean accuracy."""
    participants = [DigitsSoftmax(leaf_index=i, leaves=leaves, seed=seed) for i in range(leaves)]
    rng = np.random.default_rng(seed)
    work = Path(tempfile.mkdtemp(dir=root))
    global_model: list[np.ndarray] | None = None
    dtypes: list[str] = []
    sizes: list[int] = []
    accuracy = 0.0
    for round_number in range(1, rounds + 1):
        inputs = []
        for index, participant in enumerate(participants):
            model = read_back(global_model, dtypes) if global_model is not None else None
            result = participant.train(model, round_number)
            dtypes = [layer.dtype.str for layer in result.parameters]
            prepared = prepare_update(result.parameters, model, policy, [], rng)
            if policy.privacy.enabled:
                PrivacyLedger(work / f"leaf-{index}").record(policy.privacy.noise_multiplier)
            path = write_update(work / f"r{round_number}-leaf{index}.npz", result.weighting, prepared.parameters)
            sizes.append(path.stat().st_size)
            inputs.append(WeightedUpdate(path, result.weighting))
        out = work / f"aggregate-{round_number}.npz"
        fedavg(inputs, out)
        global_model = read_aggregate(out)
        model = read_back(global_model, dtypes)
        accuracy = float(np.mean([p.evaluate(model, round_number)["accuracy"] for p in participants]))
    epsilon = PrivacyLedger(work / "leaf-0").epsilon(policy.privacy.delta) if policy.privacy.enabled else None
    progress(f"{name}: accuracy {accuracy:.3f} after {rounds} rounds")
    return FederationRow(name, accuracy, epsilon, int(np.mean(sizes)))


def transform_costs(model_mb: float, root: Path, seed: int) -> list[CostRow]:
    """prepare_update's time and peak memory on a `model_mb` MB model, and the share of its upload."""
    rng = np.random.default_rng(seed)
    global_model = [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(model_mb, 4)]
    update = [layer + np.float32(0.01) * rng.standard_normal(layer.shape, dtype=np.float32) for layer in global_model]
    upload_s = upload_seconds(write_update(root / "update.npz", 1.0, update), root)
    policies = {
        "check + guard (NaN/inf, delta norm)": UpdatePolicy(max_update_norm_ratio=10),
        "check + guard + float16 cast": UpdatePolicy(max_update_norm_ratio=10, upload_precision="float16"),
        "check + guard + DP (clip, noise)": UpdatePolicy(max_update_norm_ratio=10,
                                                         privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)),
    }
    recent = [delta_norm(update, global_model)] * 3
    rows = []
    for name, policy in policies.items():
        tracemalloc.start()
        started = time.perf_counter()
        prepare_update(update, global_model, policy, recent, rng)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append(CostRow(name, seconds, peak / MB, seconds / upload_s))
        progress(f"{name}: {seconds:.2f} s, peak {peak / MB:.0f} MB")
    rows.append(compression_row(update, root, upload_s))
    rows.append(CostRow("upload of the archive (loopback)", upload_s, 0.0, 1.0))
    return rows


def compression_row(update: list[np.ndarray], root: Path, upload_s: float) -> CostRow:
    """Writing the archive deflated instead of stored: its time, and the bytes it saves (in the
    `peak_mb` column's place, as a percentage is what matters)."""
    stored = write_update(root / "stored.npz", 1.0, update).stat().st_size
    started = time.perf_counter()
    deflated = write_update(root / "deflated.npz", 1.0, update, compress=True).stat().st_size
    seconds = time.perf_counter() - started
    progress(f"deflate: {seconds:.2f} s, {100 * (1 - deflated / stored):.1f} % smaller")
    return CostRow(f"deflate the archive (saves {100 * (1 - deflated / stored):.1f} % of the bytes)", seconds, 0.0,
                   seconds / upload_s)


def upload_seconds(archive: Path, root: Path) -> float:
    """One upload of `archive` to a fresh local bk-server, in seconds."""
    with LocalServer(root / "bk-data") as server:
        federation = server.create_federation(leaves=2, min_updates=2)
        identity, token = read_platform_credentials(federation["leaves"][0])
        with BranchKeyClient(identity, token, ConnectionOptions(host=server.url, read_timeout_s=600)) as client:
            started = time.perf_counter()
            client.upload(archive)
            return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_options(parser, "DP noise and the large model", "5 rounds and a 20 MB model", "print JSON")
    parser.add_argument("--rounds", type=int, default=None, help="federation rounds (default 10)")
    parser.add_argument("--model-mb", type=float, default=None, help="model size for part 2 (default 100)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 10)
    args.model_mb = args.model_mb or (20.0 if args.quick else 100.0)
    if args.rounds < 1 or args.model_mb <= 0:
        parser.error("--rounds and --model-mb must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with temporary_root(args.workdir, "bk-bench-transforms-") as root:
        federation = [run_federation(name, policy, 3, args.rounds, args.seed, root)
                      for name, policy in federation_settings(args.quick).items()]
        costs = transform_costs(args.model_mb, root, args.seed)
    if args.json:
        print(json.dumps({"federation": [asdict(r) for r in federation], "costs": [asdict(r) for r in costs]}))
        return
    print(machine_summary("numpy", "dp-accounting"))
    print(f"# digits federation: 3 non-IID leaves, {args.rounds} rounds, bk-server's FedAvg; "
          f"epsilon at delta {DELTA:g}")
    print(format_table(["setting", "final mean accuracy", "epsilon", "bytes per update"],
                       [[r.setting, f"{r.final_accuracy:.3f}", "-" if r.epsilon is None else f"{r.epsilon:.2f}",
                         str(r.bytes_per_update)] for r in federation]))
    print(f"\n# update transforms on a {args.model_mb:g} MB float32 model")
    print(format_table(["step", "seconds", "peak MB (traced)", "share of the upload time"],
                       [[r.transform, f"{r.seconds:.3f}", f"{r.peak_mb:.0f}" if r.peak_mb else "-",
                         f"{100 * r.upload_share:.0f} %"] for r in costs]))


if __name__ == "__main__":
    main()
