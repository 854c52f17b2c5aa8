"""`BranchKeyCredentials`: a leaf's platform credentials and connection settings as a Prefect Block."""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.blocks.abstract import CredentialsBlock
from pydantic import ConfigDict, Field, SecretStr

from prefect_branchkey.bk_blocks.client import (
    BranchKeyClient,
    ConnectionOptions,
    LeafIdentity,
    read_platform_credentials,
)


class BranchKeyCredentials(CredentialsBlock, ConnectionOptions):
    """Credentials of one BranchKey leaf (a training site) and how to reach the platform.

    Create it in the Prefect UI, or from the credentials JSON the platform issues with
    `BranchKeyCredentials.from_platform_json(path)`; `get_client()` returns a
    `BranchKeyClient` for uploads, downloads, metrics and notifications.

    Example:
        Load saved credentials and check the run:
        ```python
        from prefect_branchkey.bk_blocks import BranchKeyCredentials

        credentials = BranchKeyCredentials.load("BLOCK_NAME")
        with credentials.get_client() as client:
            print(client.run_details())
        ```
    """

    # A validation error must not echo the values it was given, the session token among them. The
    # connection fields are `ConnectionOptions`' (declared once there); a Block is not frozen.
    model_config = ConfigDict(hide_input_in_errors=True, frozen=False)

    _block_type_name = "BranchKey Credentials"
    _block_type_slug = "branchkey-credentials"
    # Prefect annotates these HttpUrl but takes (and its own Blocks set) plain strings.
    _logo_url = "https://branchkey.com/branding/bk-logo-medium.png"  # type: ignore[assignment]
    _documentation_url = "https://github.com/branchkey/prefect-branchkey#readme"  # type: ignore[assignment]
    _description = ("Credentials of a BranchKey leaf and the settings to reach the BranchKey federated learning "
                    "platform.")

    leaf_id: str = Field(description="The leaf's id (the `id` of the platform's credentials JSON).", title="Leaf ID")
    leaf_name: str = Field(description="The leaf's name (the `name` of the credentials JSON).")
    session_token: SecretStr = Field(description="The leaf's session token; a secret, never logged.")
    tree_id: str = Field(description="The tree (federation) the leaf belongs to.", title="Tree ID")
    branch_id: str = Field(description="The branch (model being trained) the leaf belongs to.", title="Branch ID")
    owner_id: str = Field(description="The id of the user who owns the leaf.", title="Owner ID")

    @classmethod
    def from_platform_json(cls, source: str | os.PathLike[str] | dict[str, Any],
                           **settings: Any) -> BranchKeyCredentials:
        """Build the Block from the platform's credentials JSON (a path or the parsed dict), as is.

        Extra keyword arguments set the connection fields (host, notification_transport, ...).
        """
        identity, token = read_platform_credentials(source)
        return cls(leaf_id=identity.leaf_id, leaf_name=identity.leaf_name, session_token=token,
                   tree_id=identity.tree_id, branch_id=identity.branch_id, owner_id=identity.owner_id, **settings)

    def identity(self) -> LeafIdentity:
        """Who the leaf is, as the client takes it."""
        return LeafIdentity(leaf_id=self.leaf_id, leaf_name=self.leaf_name, tree_id=self.tree_id,
                            branch_id=self.branch_id, owner_id=self.owner_id)

    def connection_options(self) -> ConnectionOptions:
        """How to reach the platform, as the client takes it."""
        return ConnectionOptions(**self.model_dump(include=set(ConnectionOptions.model_fields)))

    def get_client(self, logger: logging.Logger | logging.LoggerAdapter | None = None) -> BranchKeyClient:
        """A `BranchKeyClient` for this leaf (use it as a context manager), logging to `logger`,
        by default the Block's (the run logger when made inside a run).

        The session token is unwrapped here, once: the client takes plain values and knows
        nothing of Prefect."""
        return BranchKeyClient(self.identity(), self.session_token.get_secret_value(), self.connection_options(),
                               logger=logger or self.logger)

