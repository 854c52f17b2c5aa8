"""A federation's leaves as a directory of the platform's credentials files, one JSON per leaf:
what `bk simulate` and `bk statistics` run, and what each simulated leaf's task reads again on
its worker (so no session token travels with the task)."""

from __future__ import annotations

from pathlib import Path

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.errors import BranchKeyError


class LeavesError(BranchKeyError, ValueError):
    """A credentials directory that holds no leaf."""


def leaf_files(credentials_dir: Path) -> list[Path]:
    """The credentials JSON files of the directory, sorted by name; refused when there is none."""
    paths = sorted(Path(credentials_dir).glob("*.json"))
    if not paths:
        raise LeavesError(f"no leaf credentials (*.json) in {credentials_dir}")
    return paths


def leaf_block(path: Path, host: str, transport: str, amqp_host: str | None = None) -> BranchKeyCredentials:
    """One leaf's Block from its credentials file (with the RabbitMQ host, when it is not the API's)."""
    block = BranchKeyCredentials.from_platform_json(path, host=host, notification_transport=transport)
    return block.model_copy(update={"amqp_host": amqp_host}) if amqp_host else block


def leaf_credentials(credentials_dir: Path, host: str, transport: str,
                     amqp_host: str | None = None) -> list[BranchKeyCredentials]:
    """One Block per credentials JSON in the directory (sorted by file name)."""
    return [leaf_block(path, host, transport, amqp_host) for path in leaf_files(credentials_dir)]
