"""prefect_branchkey.bk_blocks.compat.Client: the official 2.7 client's API, so scripts move over
by changing one import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks import RunNotStartedError
from prefect_branchkey.bk_blocks.archive import read_aggregate
from prefect_branchkey.bk_blocks.compat import Client

from ..support.bkserver import BkServer

PROJECT = Path(__file__).resolve().parents[2]


def test_readme_example_of_the_official_client_runs_unchanged(amqp_server: BkServer, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = amqp_server.federation(leaves=1).leaves[0]
    monkeypatch.chdir(tmp_path)
    layer1_weights, layer2_weights = np.ones((3, 2), np.float32), np.arange(4, dtype=np.float32)

    # The official README (2.7), with only the import changed and the host pointed at bk_server.
    client = Client(credentials, host=amqp_server.url)
    weighting = 1000
    parameters = [layer1_weights, layer2_weights]
    file_path = client.save_weights("model_weights", weighting, parameters)
    file_id = client.file_upload(file_path)
    print(f"Uploaded: {file_id}")
    deadline = time.time() + 30
    while client.queue.empty() and time.time() < deadline:
        time.sleep(0.1)
    if not client.queue.empty():
        aggregation_id = client.queue.get(block=False)
        client.file_download(aggregation_id)
    metrics = {"accuracy": 0.95, "loss": 0.12}
    sent = client.send_performance_metrics(aggregation_id=aggregation_id, data=json.dumps(metrics), mode="test")
    status, number, authenticated = client.run_status, client.run_number, client.is_authenticated
    client.close()

    npz_data = read_aggregate(tmp_path / "aggregated_output" / f"{aggregation_id}.npz")
    np.testing.assert_array_equal(npz_data[0], layer1_weights)
    assert file_path == "model_weights.npz" and sent
    assert (status, number, authenticated) == ("start", 1, True)
    assert (client.leaf_id, client.branch_id, client.tree_id) == (
        credentials["id"], credentials["branch_id"], credentials["tree_id"])


def test_upload_while_paused_raises_run_is_blocked(amqp_server: BkServer, tmp_path: Path) -> None:
    federation = amqp_server.federation(leaves=1)
    amqp_server.run(federation.branch_id, "pause")
    with Client(federation.leaves[0], host=amqp_server.url) as client:
        path = client.save_weights(str(tmp_path / "w"), 1, [np.ones(2)])
        with pytest.raises(RunNotStartedError, match="run is blocked"):
            client.file_upload(path)


def test_wait_for_run_sleeps_until_the_run_starts(amqp_server: BkServer, tmp_path: Path) -> None:
    federation = amqp_server.federation(leaves=2)
    amqp_server.run(federation.branch_id, "pause")
    with Client(federation.leaves[0], host=amqp_server.url, wait_for_run=True, run_check_interval_s=1) as client:
        path = client.save_weights(str(tmp_path / "w"), 1, [np.ones(2)])
        threading.Timer(1.5, amqp_server.run, args=(federation.branch_id, "start")).start()
        assert client.file_upload(path)


def test_validate_weight_shape_checks_an_open_file_and_rewinds(amqp_server: BkServer, tmp_path: Path) -> None:
    with Client(amqp_server.federation(leaves=1).leaves[0], host=amqp_server.url) as client:
        path = client.save_weights(str(tmp_path / "w"), 3, [np.ones(2)])
        with open(path, "rb") as handle:
            assert client.validate_weight_shape(handle)
            assert handle.tell() == 0


def test_metrics_failure_returns_false_like_the_official_client(amqp_server: BkServer) -> None:
    with Client(amqp_server.federation(leaves=1).leaves[0], host=amqp_server.url) as client:
        assert client.send_performance_metrics("unknown-aggregation", json.dumps({"a": 1}), "test") is False


SCRIPT_WITHOUT_PREFECT = """
import json, sys, time
import numpy as np
from prefect_branchkey.bk_blocks.compat import Client

credentials, host, work = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
client = Client(credentials, host=host)
file_id = client.file_upload(client.save_weights(work + "/w", 2, [np.full(3, 4.0, np.float32)]))
deadline = time.time() + 30
while client.queue.empty() and time.time() < deadline:
    time.sleep(0.1)
aggregation_id = client.queue.get(block=False)
client.file_download(aggregation_id)
client.close()
print(json.dumps({"aggregation_id": aggregation_id,
                  "prefect": sorted(m for m in sys.modules if m.split(".")[0] == "prefect")}))
"""


def test_compat_client_runs_a_round_where_prefect_is_not_installed(amqp_server: BkServer, tmp_path: Path) -> None:
    credentials = amqp_server.federation(leaves=1).leaves[0]
    script = tmp_path / "official_script.py"
    script.write_text(SCRIPT_WITHOUT_PREFECT)
    result = subprocess.run([sys.executable, "-m", "tests.support.without_prefect", str(script),
                             json.dumps(credentials), amqp_server.url, str(tmp_path)],
                            cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(PROJECT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["prefect"] == []
    aggregate = read_aggregate(tmp_path / "aggregated_output" / f"{report['aggregation_id']}.npz")
    np.testing.assert_array_equal(aggregate[0], np.full(3, 4.0, np.float32))


def test_prefect_blocker_refuses_prefect(tmp_path: Path) -> None:
    """The check above means something only if the blocker really keeps Prefect out."""
    script = tmp_path / "imports_prefect.py"
    script.write_text("import prefect\n")
    result = subprocess.run([sys.executable, "-m", "tests.support.without_prefect", str(script)], cwd=PROJECT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Prefect is not installed" in result.stderr
