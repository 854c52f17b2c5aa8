"""The official `branchkey` clients (2.7 over AMQP, 3.0 over WebSocket) work against bk_server unchanged.

Each client runs in its own venv (`make official-clients` builds them under .venvs/),
because they pin versions of requests and numpy of their own.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.archive import read_aggregate

from ..support.bkserver import BkServer, in_ci

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "official_clients"
VENVS = {"2.7": ROOT / ".venvs" / "branchkey-2.7", "3.0": ROOT / ".venvs" / "branchkey-3.0"}


def official_python(version: str) -> Path:
    python = VENVS[version] / "bin" / "python"
    if not python.exists():
        message = f"the official branchkey {version} client venv is missing ({python}); run `make official-clients`"
        if in_ci():
            pytest.fail(message)
        warnings.warn(f"SKIPPING: {message}", stacklevel=1)
        pytest.skip(message)
    return python


def expected_aggregate(seeds_and_weights: list[tuple[int, float]]) -> list[np.ndarray]:
    layers = []
    for seed, _ in seeds_and_weights:
        rng = np.random.default_rng(seed)
        layers.append([rng.normal(size=(6, 4)).astype(np.float32).astype(np.float64), np.array([seed, 3], np.float64)])
    total = sum(w for _, w in seeds_and_weights)
    mean = [sum(w / total * layers[i][j] for i, (_, w) in enumerate(seeds_and_weights)) for j in range(2)]
    return [mean[0].astype(np.float32), np.rint(mean[1]).astype(np.int64)]


def run_leaves(version: str, script: str, server: BkServer, tmp_path: Path) -> list[dict]:
    python = official_python(version)
    federation = server.federation(leaves=3)
    processes = []
    for index, leaf in enumerate(federation.leaves):
        creds = tmp_path / f"leaf{index}.json"
        creds.write_text(json.dumps(leaf))
        out = tmp_path / f"out{index}"
        out.mkdir()
        processes.append(subprocess.Popen(
            [str(python), str(SCRIPTS / script), str(creds), server.url, str(index), str(10.0 * (index + 1)), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def check_results(results: list[dict]) -> None:
    assert len({r["aggregation_id"] for r in results}) == 1
    assert all(r["metrics_sent"] for r in results)
    expected = expected_aggregate([(i, 10.0 * (i + 1)) for i in range(3)])
    for result in results:
        got = read_aggregate(result["path"])
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
        np.testing.assert_array_equal(got[1], expected[1])


def test_official_2_7_client_completes_a_round_over_amqp(amqp_server: BkServer, tmp_path: Path) -> None:
    results = run_leaves("2.7", "round_v2.py", amqp_server, tmp_path)
    check_results(results)
    assert results[0]["run_status"] == "start" and results[0]["run_number"] == 1


def test_official_3_0_client_completes_a_round_over_websocket(server: BkServer, tmp_path: Path) -> None:
    results = run_leaves("3.0", "round_v3.py", server, tmp_path)
    check_results(results)
    assert results[0]["min_updates"] == 3
