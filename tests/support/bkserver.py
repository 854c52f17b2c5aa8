"""A real `bk-server serve` process on 127.0.0.1 for tests, with its admin API at hand."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_dev.local_platform import LocalServer
from prefect_branchkey.bk_dev.processes import broker_available, free_port

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBIT_ADMIN = "http://127.0.0.1:15672"

__all__ = ["AMQP_URL", "RABBIT_ADMIN", "BkServer", "Federation", "broker_available", "free_port", "in_ci"]


@dataclass
class Federation:
    """What `federation create` returned: ids and one credentials dict per leaf."""

    tree_id: str
    branch_id: str
    leaves: list[dict[str, str]]


class BkServer(LocalServer):
    """A LocalServer that remembers its federations (to clean the broker) and waits for rounds."""

    def __init__(self, data_dir: Path, amqp: bool = False, options: dict[str, Any] | None = None) -> None:
        super().__init__(data_dir, amqp_url=AMQP_URL if amqp else None, options=dict(options or {}))
        self.federations: list[Federation] = []

    @property
    def amqp(self) -> bool:
        return self.amqp_url is not None

    def start(self, timeout: float = 30) -> BkServer:
        if self.amqp:
            self.options.setdefault("rabbitmq_admin_url", "http://guest:guest@127.0.0.1:15672")
        super().start(timeout)
        return self

    def federation(self, leaves: int = 3, min_updates: int | None = None, **extra: Any) -> Federation:
        data = self.create_federation(leaves, min_updates, **extra)
        federation = Federation(data["tree_id"], data["branch_id"], data["leaves"])
        self.federations.append(federation)
        return federation

    def wait_for_round(self, branch_id: str, round_number: int, timeout: float = 30) -> dict[str, Any]:
        """Poll the admin API until a round is aggregated; return that round."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.status(branch_id)["rounds"]:
                if r["round"] == round_number and r["status"] == "aggregated":
                    return r
            time.sleep(0.05)
        raise TimeoutError(f"round {round_number} of {branch_id} not aggregated within {timeout} s")

    def cleanup_broker(self) -> None:
        """Remove the vhosts and leaf users this server's federations created."""
        for federation in self.federations:
            requests.delete(f"{RABBIT_ADMIN}/api/vhosts/{federation.tree_id}", auth=("guest", "guest"), timeout=10)
            for leaf in federation.leaves:
                requests.delete(f"{RABBIT_ADMIN}/api/users/{leaf['id']}", auth=("guest", "guest"), timeout=10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def peak_rss_bytes(self) -> int:
        """The server process's peak resident set (VmHWM) so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def credentials_for(server: BkServer, leaf: dict[str, str], transport: str = "websocket",
                    host: str | None = None) -> BranchKeyCredentials:
    """The Block for one leaf of a test federation, pointed at `host` (default: the server)."""
    return BranchKeyCredentials.from_platform_json(
        leaf, host=host or server.url, notification_transport=transport, amqp_host="127.0.0.1",
        connect_timeout_s=5, read_timeout_s=60,
    )
