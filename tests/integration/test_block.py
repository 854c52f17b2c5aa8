"""The BranchKeyCredentials Block: Prefect's standard suite, JSON import, saving, registering; env settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from prefect_branchkey.bk_blocks import BranchKeyClient, BranchKeyCredentials, BranchKeySettings

PLATFORM_JSON = {"id": "leaf-uuid", "name": "hospital-a", "session_token": "s3cret-token-value",
                 "tree_id": "tree-uuid", "branch_id": "branch-uuid", "owner_id": "owner-uuid"}


class TestBranchKeyCredentialsIsAStandardBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return BranchKeyCredentials

    @pytest.mark.skip(reason="downloads the logo from the network, which is out of reach here")
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        pass


def test_platform_json_file_is_accepted_as_is(tmp_path: Path) -> None:
    path = tmp_path / "leaf.json"
    path.write_text(json.dumps(PLATFORM_JSON))
    block = BranchKeyCredentials.from_platform_json(path, host="http://127.0.0.1:8080")
    assert (block.leaf_id, block.leaf_name, block.tree_id, block.branch_id, block.owner_id) == (
        "leaf-uuid", "hospital-a", "tree-uuid", "branch-uuid", "owner-uuid")
    assert block.session_token.get_secret_value() == "s3cret-token-value"
    assert block.host == "http://127.0.0.1:8080"


def test_platform_json_missing_a_key_names_it() -> None:
    with pytest.raises(ValueError, match="missing session_token"):
        BranchKeyCredentials.from_platform_json({k: v for k, v in PLATFORM_JSON.items() if k != "session_token"})


def test_host_that_is_not_a_url_is_refused() -> None:
    with pytest.raises(ValidationError, match="host must be an http"):
        BranchKeyCredentials.from_platform_json(PLATFORM_JSON, host="app.branchkey.com")


def test_defaults_are_safe() -> None:
    block = BranchKeyCredentials.from_platform_json(PLATFORM_JSON)
    assert block.host == "https://app.branchkey.com" and block.verify_tls
    assert block.amqp_hostname == "app.branchkey.com"


def test_get_client_returns_a_branchkey_client() -> None:
    with BranchKeyCredentials.from_platform_json(PLATFORM_JSON).get_client() as client:
        assert isinstance(client, BranchKeyClient)


def test_token_is_masked_in_repr() -> None:
    assert "s3cret-token-value" not in repr(BranchKeyCredentials.from_platform_json(PLATFORM_JSON))


def test_block_saves_and_loads_with_its_secret(prefect_api: str) -> None:
    BranchKeyCredentials.from_platform_json(PLATFORM_JSON, notification_transport="amqp").save("leaf-a", overwrite=True)
    loaded = BranchKeyCredentials.load("leaf-a")
    assert loaded.session_token.get_secret_value() == "s3cret-token-value"
    assert loaded.notification_transport == "amqp"


def test_block_registers_with_prefect_block_register(prefect_api: str) -> None:
    env = os.environ | {"PREFECT_API_URL": prefect_api}
    result = subprocess.run([sys.executable, "-m", "prefect", "block", "register",
                             "-m", "prefect_branchkey.bk_blocks.credentials"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "BranchKey Credentials" in result.stdout


def test_settings_from_environment_make_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in PLATFORM_JSON.items():
        monkeypatch.setenv("BRANCHKEY_" + {"id": "LEAF_ID", "name": "LEAF_NAME"}.get(key, key.upper()), value)
    monkeypatch.setenv("BRANCHKEY_NOTIFICATION_TRANSPORT", "amqp")
    block = BranchKeySettings(_env_file=None).to_block()
    assert block.leaf_name == "hospital-a" and block.notification_transport == "amqp"
    assert block.session_token.get_secret_value() == "s3cret-token-value"


def test_settings_from_a_credentials_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "leaf.json"
    path.write_text(json.dumps(PLATFORM_JSON))
    monkeypatch.setenv("BRANCHKEY_CREDENTIALS_FILE", str(path))
    monkeypatch.setenv("BRANCHKEY_HOST", "http://edge-gateway:8080")
    block = BranchKeySettings(_env_file=None).to_block()
    assert block.leaf_id == "leaf-uuid" and block.host == "http://edge-gateway:8080"


def test_settings_read_a_dotenv_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "leaf.json"
    path.write_text(json.dumps(PLATFORM_JSON))
    (tmp_path / ".env").write_text(f"BRANCHKEY_CREDENTIALS_FILE={path}\n")
    monkeypatch.chdir(tmp_path)
    assert BranchKeySettings().to_block().leaf_name == "hospital-a"


def test_settings_without_identity_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRANCHKEY_LEAF_ID", "x")
    with pytest.raises(ValidationError, match="BRANCHKEY_SESSION_TOKEN"):
        BranchKeySettings(_env_file=None)
