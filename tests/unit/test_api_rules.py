"""The platform API's rules, checked in-process: FastAPI's TestClient over `create_app`, no
server process and no broker (the integration tier runs the same API as a real process)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from prefect_branchkey.bk_blocks.archive import write_update
from prefect_branchkey.bk_server.app import create_app
from prefect_branchkey.bk_server.settings import ServerSettings

ADMIN = {"Authorization": "Bearer admin-token"}


class Platform:
    """An in-process platform with one federation; requests are made as its leaves."""

    def __init__(self, client: TestClient, leaves: int, tmp_path: Path) -> None:
        self.client = client
        self.tmp_path = tmp_path
        reply = client.post("/admin/v1/federations", json={"leaves": leaves, "min_updates": leaves}, headers=ADMIN)
        assert reply.status_code == 201, reply.text
        self.federation = reply.json()["data"]
        self.leaves: list[dict[str, str]] = self.federation["leaves"]

    def headers(self, leaf: int = 0, **extra: str) -> dict[str, str]:
        credentials = self.leaves[leaf]
        return {"Authorization": f"Bearer {credentials['id']}:{credentials['session_token']}", **extra}

    def upload(self, leaf: int = 0, value: float = 1.0, shape: tuple[int, ...] = (3,), **headers: str) -> Any:
        path = write_update(self.tmp_path / f"update-{leaf}-{value}.npz", 10.0,
                            [np.full(shape, value, np.float32)])
        data = {"data": json.dumps({"leaf_name": self.leaves[leaf]["name"], "metadata": "{}"})}
        files = {"file": (path.name, io.BytesIO(path.read_bytes()), "application/octet-stream")}
        return self.client.post("/api/v1/file/upload", data=data, files=files, headers=self.headers(leaf, **headers))

    def run(self, action: str) -> None:
        reply = self.client.post(f"/admin/v1/branches/{self.federation['branch_id']}/run/{action}", headers=ADMIN)
        assert reply.status_code == 200, reply.text

    def run_details(self, leaf: int = 0) -> dict[str, Any]:
        reply = self.client.get(f"/api/v1/run/{self.federation['branch_id']}", headers=self.headers(leaf))
        assert reply.status_code == 200, reply.text
        return reply.json()["data"]

    def rounds(self) -> list[dict[str, Any]]:
        reply = self.client.get(f"/admin/v1/branches/{self.federation['branch_id']}", headers=ADMIN)
        return reply.json()["data"]["rounds"]


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """Two leaves, both needed to close a round."""
    app = create_app(ServerSettings(data_dir=tmp_path / "data"), admin_token="admin-token")
    with TestClient(app) as client:
        yield Platform(client, 2, tmp_path)


def test_request_without_credentials_is_refused_401(platform: Platform) -> None:
    reply = platform.client.get(f"/api/v1/run/{platform.federation['branch_id']}")
    assert reply.status_code == 401 and "Authorization" in reply.json()["error"]


def test_wrong_session_token_is_refused_401(platform: Platform) -> None:
    headers = {"Authorization": f"Bearer {platform.leaves[0]['id']}:wrong"}
    reply = platform.client.get(f"/api/v1/run/{platform.federation['branch_id']}", headers=headers)
    assert reply.status_code == 401


def test_leaf_asking_about_another_branch_is_refused_403(platform: Platform) -> None:
    reply = platform.client.get("/api/v1/run/some-other-branch", headers=platform.headers())
    assert reply.status_code == 403


def test_upload_refused_while_run_paused(platform: Platform) -> None:
    platform.run("pause")
    reply = platform.upload()
    assert reply.status_code == 409 and reply.json()["code"] == "run_blocked"
    assert platform.rounds()[0]["updates"] == 0


def test_upload_for_a_closed_round_is_refused_as_stale(platform: Platform) -> None:
    platform.upload(0)
    platform.upload(1)
    reply = platform.upload(0, value=2.0, **{"x-bk-run-number": "1", "x-bk-round": "1"})
    assert reply.status_code == 409 and reply.json()["code"] == "stale_round"
    assert platform.rounds()[1]["updates"] == 0


def test_upload_naming_half_its_round_is_refused_400(platform: Platform) -> None:
    reply = platform.upload(**{"x-bk-round": "1"})
    assert reply.status_code == 400 and "go together" in reply.json()["error"]


def test_update_with_other_layers_than_the_round_is_refused_naming_the_layer(platform: Platform) -> None:
    platform.upload(0, shape=(3,))
    reply = platform.upload(1, shape=(4,))
    assert reply.status_code == 422 and "layer_0" in reply.json()["error"]
    assert platform.rounds()[0]["updates"] == 1


def test_replayed_upload_with_the_same_key_counts_once(platform: Platform) -> None:
    first = platform.upload(0, **{"Idempotency-Key": "k1"})
    again = platform.upload(0, **{"Idempotency-Key": "k1"})
    assert first.json()["data"]["file_id"] == again.json()["data"]["file_id"]
    assert platform.rounds()[0]["updates"] == 1


def test_run_details_name_the_open_round_and_latest_aggregate(platform: Platform) -> None:
    assert platform.run_details()["round"] == 1
    platform.upload(0)
    platform.upload(1)
    details = platform.run_details()
    assert details["round"] == 2 and details["run_number"] == 1


def test_without_extensions_run_details_are_the_official_platforms(tmp_path: Path) -> None:
    app = create_app(ServerSettings(data_dir=tmp_path / "data", extensions=False), admin_token="admin-token")
    with TestClient(app) as client:
        assert set(Platform(client, 1, tmp_path).run_details()) == {"run_status", "run_number"}


def test_admin_api_refuses_a_wrong_admin_token(platform: Platform) -> None:
    reply = platform.client.get(f"/admin/v1/branches/{platform.federation['branch_id']}",
                                headers={"Authorization": "Bearer nope"})
    assert reply.status_code == 401
