"""The `bk-server` command line: federations and run control through the admin API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..support.bkserver import BkServer
from ..support.wire import run_details

CREDENTIAL_KEYS = {"id", "name", "session_token", "tree_id", "branch_id", "owner_id"}


def bk_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefect_branchkey.bk_server.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_federation_create_writes_owner_only_official_credentials(server: BkServer, tmp_path: Path) -> None:
    result = bk_server("federation", "create", "--data-dir", str(server.data_dir), "--leaves", "3",
                       "--min-updates", "2", "--out", str(tmp_path / "creds"))
    assert result.returncode == 0, result.stderr
    paths = [Path(p) for p in json.loads(result.stdout)["credentials"]]
    assert len(paths) == 3
    for path in paths:
        assert path.stat().st_mode & 0o077 == 0
        assert set(json.loads(path.read_text())) == CREDENTIAL_KEYS
    leaf = json.loads(paths[0].read_text())
    assert run_details(server, leaf).json()["data"]["run_status"] == "start"


def test_federation_create_names_leaves_and_files_after_the_branch(server: BkServer, tmp_path: Path) -> None:
    result = bk_server("federation", "create", "--data-dir", str(server.data_dir), "--leaves", "2",
                       "--min-updates", "2", "--branch", "digits", "--out", str(tmp_path / "creds"))
    assert result.returncode == 0, result.stderr
    paths = [Path(p) for p in json.loads(result.stdout)["credentials"]]
    assert [(p.name, json.loads(p.read_text())["name"]) for p in paths] == [
        ("digits-leaf-1.json", "digits-leaf-1"), ("digits-leaf-2.json", "digits-leaf-2")]


def test_federation_create_without_a_branch_name_calls_it_main(server: BkServer, tmp_path: Path) -> None:
    result = bk_server("federation", "create", "--data-dir", str(server.data_dir), "--leaves", "1",
                       "--min-updates", "1", "--out", str(tmp_path / "creds"))
    assert result.returncode == 0, result.stderr
    (path,) = [Path(p) for p in json.loads(result.stdout)["credentials"]]
    assert json.loads(path.read_text())["name"] == "main-leaf-1"


def test_run_pause_through_the_cli_reaches_the_leaves(server: BkServer) -> None:
    federation = server.federation(leaves=1)
    result = bk_server("run", "pause", "--data-dir", str(server.data_dir), "--branch", federation.branch_id)
    assert result.returncode == 0, result.stderr
    assert run_details(server, federation.leaves[0]).json()["data"]["run_status"] == "pause"


def test_run_control_with_server_url_and_admin_token(server: BkServer) -> None:
    federation = server.federation(leaves=1)
    result = bk_server("run", "stop", "--server", server.url, "--admin-token", server.admin_token,
                       "--branch", federation.branch_id)
    assert result.returncode == 0, result.stderr
    assert run_details(server, federation.leaves[0]).json()["data"]["run_status"] == "stop"


def test_wrong_admin_token_is_a_clear_error(server: BkServer) -> None:
    result = bk_server("run", "stop", "--server", server.url, "--admin-token", "nope", "--branch", "x")
    assert result.returncode == 1
    assert "server refused (401)" in result.stderr


def test_admin_command_without_a_running_server_says_so(tmp_path: Path) -> None:
    result = bk_server("run", "start", "--data-dir", str(tmp_path), "--branch", "x")
    assert result.returncode == 1
    assert "is `bk-server serve --data-dir" in result.stderr


def test_min_updates_above_leaf_count_is_refused(server: BkServer, tmp_path: Path) -> None:
    result = bk_server("federation", "create", "--data-dir", str(server.data_dir), "--leaves", "2",
                       "--min-updates", "3", "--out", str(tmp_path / "creds"))
    assert result.returncode == 1
    assert "min_updates must be between 1 and the number of leaves" in result.stderr


def test_field_operations_are_assigned_through_the_cli(server: BkServer) -> None:
    federation = server.federation(leaves=1)
    result = bk_server("fields", "n_cases=sum", "spacing=mean:n_cases", "--data-dir", str(server.data_dir),
                       "--branch", federation.branch_id)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fields"] == {"n_cases": {"op": "sum"},
                                                   "spacing": {"op": "mean", "weight": "n_cases"}}


def test_unknown_field_operation_is_a_clear_error(server: BkServer) -> None:
    federation = server.federation(leaves=1)
    result = bk_server("fields", "n_cases=median", "--data-dir", str(server.data_dir), "--branch", federation.branch_id)
    assert result.returncode == 1 and "operation must be one of sum, min, max, mean, must_match" in result.stderr
