"""Prepare a Prefect server for edge leaves: the Block type, the process work pool, one
work queue per leaf (so its runs go to its machine's worker), and one credentials Block per leaf.

Every step is idempotent: rerunning it brings the server to the same state, so a leaf
can be added by running it again with one more credentials file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.workers.process import ProcessWorker

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.errors import BranchKeyError
from prefect_branchkey.flows.publishing.assets import check_asset_keys

DEFAULT_POOL = "branchkey-edge"
BLOCK_NAME = re.compile(r"^[a-z0-9-]+$")


class EdgeSetupError(BranchKeyError, ValueError):
    """A leaf cannot be set up as asked (bad Block name, unreadable credentials file)."""


@dataclass(frozen=True)
class LeafSpec:
    """One leaf to set up: the name of its Block and queue (None: the leaf's own name on the
    platform) and the platform's credentials JSON."""

    name: str | None
    credentials_file: Path

    @classmethod
    def parse(cls, text: str) -> LeafSpec:
        """`PATH` (`creds/digits-leaf-1.json`): the Block and queue take the leaf's name on the
        platform; or `NAME=PATH` to name them otherwise."""
        name, sep, path = text.partition("=")
        if not sep:
            return cls(None, Path(text))
        name = name.strip()
        _check_block_name(name, f"leaf name {name!r}")
        return cls(name, Path(path))

    def block_name(self, block: BranchKeyCredentials) -> str:
        """The Block and queue name: the one given, else the leaf's name on the platform, so that
        the Block, queue, deployments, runs, tags and artifacts all say the same."""
        if self.name is not None:
            return self.name
        _check_block_name(block.leaf_name, f"{self.credentials_file}: the platform's leaf name {block.leaf_name!r}",
                          hint=f"; name the Block and queue with NAME={self.credentials_file}")
        return block.leaf_name


def _check_block_name(name: str, what: str, hint: str = "") -> None:
    if not BLOCK_NAME.fullmatch(name):
        raise EdgeSetupError(f"{what} cannot name a Block and queue (lowercase letters, digits and dashes){hint}")


def require_api_url() -> None:
    """Refuse to set anything up without PREFECT_API_URL: it would land in a throwaway local database."""
    if not PREFECT_API_URL.value():
        raise EdgeSetupError("PREFECT_API_URL is not set: point it at the Prefect server the workers use "
                             "(or `prefect cloud login`), else the set-up would land in a throwaway local database")


def register_block_types() -> None:
    """Register `BranchKeyCredentials` with the server (as
    `prefect block register -m prefect_branchkey.bk_blocks.credentials`)."""
    BranchKeyCredentials.register_type_and_schema()


def ensure_work_pool(pool: str = DEFAULT_POOL) -> bool:
    """Create the process work pool unless it exists; True if it was created."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template,
                                                   description="BranchKey leaves on edge machines"))
            return True


def ensure_leaf_queue(leaf: str, pool: str = DEFAULT_POOL) -> None:
    """The leaf's work queue in the pool, served by the leaf's machine only.

    No queue concurrency limit: a limit would hold a second run of the leaf back and run it
    later (a backlog after every slow round or outage); the deployments' CANCEL_NEW limit
    and the flows' work-dir lock cancel it instead.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_work_queue_by_name(leaf, work_pool_name=pool)
        except ObjectNotFound:
            client.create_work_queue(leaf, work_pool_name=pool, description=f"Flow runs of BranchKey leaf {leaf}")


def leaf_block(spec: LeafSpec, host: str, transport: Literal["websocket", "amqp"] = "websocket",
               **settings: Any) -> BranchKeyCredentials:
    """The `BranchKeyCredentials` Block of the leaf's credentials JSON, or EdgeSetupError naming the file."""
    try:
        block = BranchKeyCredentials.from_platform_json(spec.credentials_file, host=host,
                                                        notification_transport=transport, **settings)
        check_asset_keys(block.tree_id, block.branch_id, block.leaf_id, block.leaf_name)
        return block
    except (OSError, ValueError) as exc:
        raise EdgeSetupError(f"cannot read leaf credentials {spec.credentials_file}: {exc}") from None


def set_up_edge(leaves: list[LeafSpec], host: str, transport: Literal["websocket", "amqp"] = "websocket",
                pool: str = DEFAULT_POOL, **settings: Any) -> list[BranchKeyCredentials]:
    """Everything a Prefect server needs before `prefect deploy --all`, for these leaves.

    Every credentials file is read first, so a bad one changes nothing on the server.
    """
    require_api_url()
    blocks = [leaf_block(spec, host, transport, **settings) for spec in leaves]
    names = [spec.block_name(block) for spec, block in zip(leaves, blocks, strict=True)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise EdgeSetupError(f"two leaves would share the Block and queue {', '.join(repeated)}: give each its own "
                             "name with NAME=PATH")
    register_block_types()
    ensure_work_pool(pool)
    for name, block in zip(names, blocks, strict=True):
        ensure_leaf_queue(name, pool)
        block.save(name, overwrite=True)
    return blocks
