"""Authentication and authorisation of the leaf API and the admin API."""

from __future__ import annotations

import re

import requests

from prefect_branchkey.bk_server.platform import new_secret

from ..support.bkserver import BkServer
from ..support.wire import headers, run_details


def test_run_details_answer_status_and_number(server: BkServer) -> None:
    leaf = server.federation(leaves=2).leaves[0]
    response = run_details(server, leaf)
    assert response.status_code == 200
    assert response.json() == {"data": {"run_status": "start", "run_number": 1, "round": 1,
                                        "aggregating": [], "latest_aggregation": None,
                                        "latest_statistics": None}}


def test_missing_token_is_401_with_json_error(server: BkServer) -> None:
    branch = server.federation(leaves=1).branch_id
    response = requests.get(f"{server.url}/api/v1/run/{branch}", timeout=10)
    assert response.status_code == 401
    assert "Authorization" in response.json()["error"]


def test_wrong_token_is_401(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    forged = leaf | {"session_token": "not-the-token"}
    response = run_details(server, forged)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid leaf id or session token"


def test_unknown_leaf_is_401(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    response = run_details(server, leaf | {"id": "00000000-0000-0000-0000-000000000000"})
    assert response.status_code == 401


def test_other_branch_is_403(server: BkServer) -> None:
    ours = server.federation(leaves=1).leaves[0]
    theirs = server.federation(leaves=1).branch_id
    response = run_details(server, ours, branch_id=theirs)
    assert response.status_code == 403
    assert "branch" in response.json()["error"]


def test_branch_config_of_other_branch_is_403(server: BkServer) -> None:
    ours = server.federation(leaves=1).leaves[0]
    theirs = server.federation(leaves=1).branch_id
    response = requests.get(f"{server.url}/api/v1/config/branch/{theirs}", headers=headers(ours), timeout=10)
    assert response.status_code == 403


def test_admin_api_refuses_leaf_token(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    response = requests.get(f"{server.url}/admin/v1/branches", headers=headers(leaf), timeout=10)
    assert response.status_code == 401


def test_admin_file_is_owner_only(server: BkServer) -> None:
    assert (server.data_dir / "admin.json").stat().st_mode & 0o077 == 0


def test_generated_tokens_are_safe_command_line_arguments() -> None:
    tokens = [new_secret() for _ in range(256)]
    assert all(re.fullmatch(r"[0-9a-f]{64}", token) for token in tokens)
