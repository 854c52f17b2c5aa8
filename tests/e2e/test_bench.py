"""The README's benchmark commands run and report what they measure (their figures are not judged here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[2]


def _bench(script: str, tmp_path: Path) -> Any:
    """Run `bench/<script> --quick --json` as the README shows it; its parsed output."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    result = subprocess.run([sys.executable, f"bench/{script}", "--quick", "--json", "--workdir", str(tmp_path)],
                            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, _stderr_tail(result.stderr)
    return json.loads(result.stdout)


def _stderr_tail(stderr: str, chars: int = 20000) -> str:
    """The end of a benchmark's stderr, less the list of extension modules that a child killed by a
    signal prints after its threads' stacks: the stacks are what explains the crash."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("Extension modules:"))[-chars:]


def test_aggregate_benchmark_checks_fedavg_against_the_naive_result(tmp_path: Path) -> None:
    rows = _bench("aggregate.py", tmp_path)
    fedavg = [row for row in rows if row["method"].startswith("fedavg")]
    assert fedavg and all(row["check"] == "OK" for row in fedavg), rows
    assert all(row["peak_rss_mb"] > 0 and row["seconds"] > 0 for row in rows)


def test_client_benchmark_measures_transfers_and_notification_latency(tmp_path: Path) -> None:
    report = _bench("client.py", tmp_path)
    assert {row["client"] for row in report["transfer"]} >= {"bk_blocks"}
    assert all(row["upload_mb_s"] > 0 and row["download_mb_s"] > 0 for row in report["transfer"])
    assert report["latency"] and all(row["p50_ms"] > 0 for row in report["latency"])


@pytest.mark.rabbitmq
def test_orchestration_benchmark_measures_every_transport(tmp_path: Path, rabbitmq: None) -> None:
    report = _bench("orchestration.py", tmp_path)
    assert {row["transport"] for row in report["rows"]} == {"websocket", "amqp"}
    assert all(row["overhead_p50"] >= 0 and row["samples"] > 0 for row in report["rows"])


def test_simulation_benchmark_finds_one_update_per_drawn_leaf_in_every_round(tmp_path: Path) -> None:
    rows = _bench("simulation.py", tmp_path)
    assert [(row["leaves"], row["drawn"], row["workers"]) for row in rows] == [(10, 3, 2)]
    assert rows[0]["exact"] and rows[0]["round_p50"] > 0 and rows[0]["worker_rss_mb"] > 0, rows


def test_large_model_benchmark_reports_each_leafs_peak_memory_and_steps(tmp_path: Path) -> None:
    report = _bench("large_model.py", tmp_path)
    assert len(report["leaf_peak_mb"]) == 2 and all(peak > report["model_mb"] for peak in report["leaf_peak_mb"])
    assert report["server_peak_mb"] > 0 and report["upload_mb_s"] > 0 and report["download_mb_s"] > 0
    assert set(report["steps_p50_s"]) >= {"upload_s", "wait_s", "download_s", "round_s"}


def test_transfer_rate_benchmark_times_both_clients_on_the_same_bytes(tmp_path: Path) -> None:
    report = _bench("transfer_rate.py", tmp_path)
    assert report["same_bytes"], report
    assert report["stored_bytes"] == {"ours": [report["archive_bytes"]], "plain": [report["archive_bytes"]]}
    hashes = report["downloaded_sha256"]
    assert hashes["ours"] == hashes["plain"] == hashes["plain+fsync"], hashes
    assert set(report["mb_s"]) == {"upload ours", "upload ours post", "upload plain", "download ours",
                                   "download plain", "download plain+fsync"}
    assert all(rate > 0 for rate in report["mb_s"].values()), report["mb_s"]
    assert report["upload_share"] > 0 and report["download_share"] > 0
    assert report["target"] is None and report["target_met"] is None


def test_training_that_saturates_every_core_starves_no_heartbeat_keepalive_or_publication(tmp_path: Path) -> None:
    """Three torch leaves, each training with every core for 40 s (past Prefect's 30 s heartbeat
    window) on a 2-core machine: heartbeats keep their rhythm, the 1 s notification keepalives are
    answered (one connection per leaf), the round is published, and no log has an error."""
    report = _bench("real_rounds.py", tmp_path)
    assert [row["round"] for row in report["rounds"]] == [1]
    assert 0 <= report["rounds"][0]["overhead_share"] < 1, report["rounds"]
    assert report["heartbeat_runs"] == 3 and report["heartbeats"] >= 6, report
    # Twice the interval: a run is taken for lost by an automation that waits for about three.
    assert report["heartbeat_max_gap_s"] < 60, f"a heartbeat came {report['heartbeat_max_gap_s']:.0f} s after the last"
    assert set(report["connections"].values()) == {1}, report["connections"]
    assert report["visible_max_s"] >= 0 and report["events_per_leaf_round"] > 0
    assert report["bad_lines"] and sum(report["bad_lines"].values()) == 0, report["bad_lines"]



def test_soak_benchmark_runs_every_round_with_compaction_and_reports_what_grows(tmp_path: Path) -> None:
    """30 short rounds of one leaf, its history compacted past 4 loose rows: every round is in the
    history once, and at least 10 rounds apart (the bench polls, so a busy machine may sample round
    11 rather than 10) and after the last round a report of disk, RSS, history reads and the Prefect
    database. A report may catch an append before its compaction: 5 loose rows, never more."""
    report = _bench("soak.py", tmp_path)
    assert report["every_round_once"] and report["failure"] is None, report
    rounds = [row["round"] for row in report["samples"]]
    assert len(rounds) == 3 and rounds[-1] == 30, rounds
    assert all(later - earlier >= 10 for earlier, later in zip([0, *rounds[:-2]], rounds[:-1], strict=True)), rounds
    assert all(row["loose"] <= 5 and row["segments"] >= 1 for row in report["samples"]), report["samples"]
    assert all(row["disk_mb"] > 0 and row["read_s"] > 0 and row["db_mb"] > 0 for row in report["samples"])
    *running, last = report["samples"]
    assert all(row["rss_mb"] > 0 for row in running) and (last["rss_mb"] is None or last["rss_mb"] > 0), running

@pytest.mark.e2e
def test_deployed_round_benchmark_breaks_each_run_into_its_phases(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    result = subprocess.run([sys.executable, "bench/deployed_round.py", "--rounds", "2", "--json",
                             "--workdir", str(tmp_path)], cwd=PROJECT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    samples: list[dict[str, Any]] = json.loads(result.stdout)
    assert len(samples) == 3, "one measured run per leaf"
    for sample in samples:
        parts = sample["queued"] + sample["launch"] + sample["start"] + sample["tasks"] + sample["finish"]
        assert parts == pytest.approx(sample["total"], abs=1e-6) and min(sample.values()) >= 0, sample
