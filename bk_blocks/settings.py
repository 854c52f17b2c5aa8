"""Credentials from the environment (`BRANCHKEY_*`, or a `.env` file) for edge machines without Blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_branchkey.bk_blocks.client import ConnectionOptions
from prefect_branchkey.bk_blocks.credentials import BranchKeyCredentials


class BranchKeySettings(BaseSettings, ConnectionOptions):
    """The same fields as the Block, read from `BRANCHKEY_<FIELD>` variables (the connection
    fields are `ConnectionOptions`').

    `BRANCHKEY_CREDENTIALS_FILE` may point at the platform's credentials JSON instead of
    giving the six identity values one by one.
    """

    # hide_input_in_errors: a validation error must not echo the values, the session token among them.
    model_config = SettingsConfigDict(env_prefix="BRANCHKEY_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True, frozen=False)

    credentials_file: Path | None = Field(default=None, description="The platform's credentials JSON.")
    leaf_id: str | None = None
    leaf_name: str | None = None
    session_token: SecretStr | None = None
    tree_id: str | None = None
    branch_id: str | None = None
    owner_id: str | None = None

    @model_validator(mode="after")
    def _identity_is_complete(self) -> BranchKeySettings:
        identity = ("leaf_id", "leaf_name", "session_token", "tree_id", "branch_id", "owner_id")
        missing = [name for name in identity if getattr(self, name) is None]
        if self.credentials_file is None and missing:
            names = ", ".join(f"BRANCHKEY_{name.upper()}" for name in missing)
            raise ValueError(f"set BRANCHKEY_CREDENTIALS_FILE, or all of the leaf's identity: missing {names}")
        return self

    def connection_settings(self) -> dict[str, Any]:
        return self.model_dump(include=set(ConnectionOptions.model_fields))

    def to_block(self) -> BranchKeyCredentials:
        """The `BranchKeyCredentials` Block these settings describe (save it with `.save(name)`)."""
        if self.credentials_file is not None:
            return BranchKeyCredentials.from_platform_json(self.credentials_file, **self.connection_settings())
        assert self.session_token is not None
        return BranchKeyCredentials(
            leaf_id=self.leaf_id, leaf_name=self.leaf_name, session_token=self.session_token,
            tree_id=self.tree_id, branch_id=self.branch_id, owner_id=self.owner_id, **self.connection_settings(),
        )
