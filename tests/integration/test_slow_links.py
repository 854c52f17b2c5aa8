"""A leaf behind a slow uplink: the upload's progress in the run's log at a line per tenth, no
timeout cutting a slow but healthy transfer, and a link cut at 80 % retried and counted once.

The link is a throttling proxy; an 80 MB update at 10 MB/s takes 8 s, twice the leaf's read
timeout, so only a transfer timed as a whole (which the leaf never does) would cut it. The read
timeout still leaves the platform 4 s to check and store the update once its last byte is in (2 s
was not always enough on a busy machine, beside a test writing 1 GB)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.archive import write_update
from prefect_branchkey.tasks import LeafSession, upload_weights

from ..support.bkserver import BkServer, credentials_for
from ..support.faulty_proxy import FaultyProxy

LINK_BYTES_PER_S = 10e6
READ_TIMEOUT_S = 4
FAST = {"retry_delay_seconds": 0.1, "retry_jitter_factor": None}


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every task here runs against the session's Prefect server."""


@pytest.fixture
def slow_link(server: BkServer) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(server.url, rate=LINK_BYTES_PER_S)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def large_update(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 80 MB update: above the size from which a transfer reports each tenth."""
    layers = [np.random.default_rng(i).standard_normal(5_000_000, dtype=np.float32) for i in range(4)]
    return write_update(tmp_path_factory.mktemp("large") / "run1-round1.npz", 1.0, layers)


def _behind(server: BkServer, proxy: FaultyProxy, open_session: Callable[..., LeafSession]) -> tuple[LeafSession, str]:
    federation = server.federation(leaves=2)
    credentials = credentials_for(server, federation.leaves[0], host=proxy.url).model_copy(
        update={"read_timeout_s": READ_TIMEOUT_S})
    return open_session(credentials), federation.branch_id


def test_a_slow_upload_reports_each_tenth_and_is_not_cut_by_a_timeout(
        server: BkServer, slow_link: FaultyProxy, large_update: Path, open_session: Callable[..., LeafSession],
        caplog: pytest.LogCaptureFixture) -> None:
    session, branch_id = _behind(server, slow_link, open_session)
    with caplog.at_level(logging.INFO):
        upload_weights.with_options(**FAST)(session, large_update, 1, 1)
    progress = [m.split(": ", 1)[1].split(" (")[0] for m in caplog.messages if m.startswith("upload of run1-round1")]
    assert progress == [f"{p} %" for p in range(10, 100, 10)]
    assert slow_link.count("POST", "/api/v1/file/upload") == 1
    assert server.status(branch_id)["rounds"][0]["updates"] == 1


def test_an_upload_cut_at_80_percent_is_retried_and_counted_once(
        server: BkServer, slow_link: FaultyProxy, large_update: Path,
        open_session: Callable[..., LeafSession]) -> None:
    session, branch_id = _behind(server, slow_link, open_session)
    slow_link.inject("cut-80", "/api/v1/file/upload")
    receipt = upload_weights.with_options(**FAST)(session, large_update, 1, 1)
    attempts = [h for (method, path), h in zip(slow_link.seen, slow_link.headers_seen, strict=True)
                if method == "POST" and "/api/v1/file/upload" in path]
    assert receipt.file_id and len(attempts) == 2
    assert attempts[0]["Idempotency-Key"] == attempts[1]["Idempotency-Key"], "the retry is the same upload"
    assert server.status(branch_id)["rounds"][0]["updates"] == 1
