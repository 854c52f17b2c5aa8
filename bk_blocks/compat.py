"""The official `branchkey` 2.7 `Client` API, built on `BranchKeyClient`.

A script written against the official client moves over by changing one import:

    from prefect_branchkey.bk_blocks.compat import Client      # was: from branchkey.client import Client

What differs, on purpose: nothing calls `sys.exit` or prints; errors are the typed
`BranchKeyError` classes (still `Exception`s) carrying the platform's message; archives
are written uncompressed (much faster, a few percent larger); requests have timeouts;
the RabbitMQ host is the API's host name without its port.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from contextlib import suppress
from queue import Empty, Full, LifoQueue
from typing import Any, BinaryIO

import numpy as np

from prefect_branchkey.bk_blocks.archive import ArchiveError, inspect_update
from prefect_branchkey.bk_blocks.client import BranchKeyClient, ConnectionOptions, read_platform_credentials
from prefect_branchkey.bk_blocks.errors import ArchiveRejectedError, BranchKeyError, RunNotStartedError
from prefect_branchkey.bk_blocks.notifications import AggregationNotice

log = logging.getLogger(__name__)
AGGREGATED_OUTPUT_DIR = "./aggregated_output"


class Client:
    """Drop-in replacement for `branchkey.client.Client` (2.7)."""

    def __init__(
        self,
        credentials: dict[str, str],
        host: str = "https://app.branchkey.com",
        rbmq_host: str | None = None,
        rbmq_port: int = 5672,
        ssl: bool = True,
        wait_for_run: bool = False,
        run_check_interval_s: int = 30,
        proxies: dict[str, str] | None = None,
    ) -> None:
        self._identity, token = read_platform_credentials(credentials)
        options = ConnectionOptions(host=host, amqp_host=rbmq_host, amqp_port=rbmq_port, verify_tls=ssl,
                                    proxies=proxies, notification_transport="amqp")
        self._client = BranchKeyClient(self._identity, token, options)
        self._wait_for_run = wait_for_run
        self._run_check_interval_s = run_check_interval_s
        self.queue: LifoQueue[str] = LifoQueue(maxsize=1)
        self._client.run_details()
        self._authenticated = True
        listener = self._client.listen()
        listener.set_handler(self._offer)

    def _offer(self, notice: AggregationNotice) -> None:
        """Keep only the latest aggregation id in `queue`, as the official client does."""
        while True:
            try:
                self.queue.put_nowait(notice.aggregation_id)
                return
            except Full:
                with suppress(Empty):
                    self.queue.get_nowait()

    def get_run_details(self) -> None:
        self._client.run_details()

    def convert_pytorch_numpy(self, model: Iterable[Any], weighting: float = 1) -> tuple[float, list[np.ndarray]]:
        """Parameters from a PyTorch `named_parameters()` iterator, as numpy arrays, in order."""
        return weighting, [param.data.cpu().detach().numpy() for _, param in model]

    def save_weights(self, file_path: str, weighting: float, parameters: list[np.ndarray]) -> str:
        """Write an update archive (`.npz` added if missing) and return its path."""
        if not file_path.endswith(".npz"):
            file_path += ".npz"
        self._client.write_update(file_path, weighting, parameters)
        return file_path

    def validate_weight_shape(self, file: BinaryIO) -> bool:
        """Check an open update archive; the file position is reset afterwards."""
        try:
            inspect_update(file.name)
        except ArchiveError as exc:
            raise ArchiveRejectedError(f"[validate_weight_shape] {exc}") from None
        finally:
            file.seek(0)
        return True

    def file_upload(self, file_path: str) -> str:
        """Upload an update; with `wait_for_run` sleep while the run is not started."""
        while self.run_status != "start":
            if not self._wait_for_run:
                raise RunNotStartedError("run is blocked", run_status=self.run_status)
            log.info("run is blocked, sleeping %s s before checking again", self._run_check_interval_s)
            time.sleep(self._run_check_interval_s)
            self.get_run_details()
        return self._client.upload(file_path)

    def file_download(self, file_id: str) -> bool:
        """Download an aggregate to `./aggregated_output/<file_id>.npz`."""
        self._client.download(file_id, AGGREGATED_OUTPUT_DIR)
        return True

    def send_performance_metrics(self, aggregation_id: str, data: str, mode: str) -> bool:
        """Send metrics (`data` a JSON string); False on failure, as the official client returns."""
        try:
            self._client.send_metrics(aggregation_id, json.loads(data), mode)  # type: ignore[arg-type]
            return True
        except (BranchKeyError, ValueError) as exc:
            log.error("sending performance metrics for aggregation %s failed: %s", aggregation_id, exc)
            return False

    @property
    def leaf_id(self) -> str:
        return self._identity.leaf_id

    @property
    def branch_id(self) -> str:
        return self._identity.branch_id

    @property
    def tree_id(self) -> str:
        return self._identity.tree_id

    @property
    def user_id(self) -> str:
        return self._identity.owner_id

    @property
    def is_authenticated(self) -> bool:
        return self._authenticated

    @property
    def run_status(self) -> str:
        return self._client.run_status

    @property
    def run_number(self) -> int:
        return self._client.run_number

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

