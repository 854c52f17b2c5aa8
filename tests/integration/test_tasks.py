"""The platform tasks: retried only on transient failures, safe to retry, never cached."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prefect import flow

from prefect_branchkey.bk_blocks import ArchiveRejectedError, AuthenticationError, RunStoppedError
from prefect_branchkey.bk_blocks.analytics import write_statistics
from prefect_branchkey.tasks import (
    LeafSession,
    UploadReceipt,
    upload_statistics,
    upload_weights,
    wait_for_aggregation,
    wait_for_run,
    wait_for_statistics,
)

from ..support.bkserver import BkServer, Federation, credentials_for
from ..support.faulty_proxy import FaultyProxy

FAST = {"retry_delay_seconds": 0.1, "retry_jitter_factor": None}
AMQP = "amqp"


@pytest.fixture
def proxy(amqp_server: BkServer) -> Iterator[FaultyProxy]:
    """A proxy in front of the API; the leaves behind it take notices over AMQP, which go
    straight to the broker, so the proxy sees only HTTP."""
    proxy = FaultyProxy(amqp_server.url)
    yield proxy
    proxy.close()


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every task here runs against the session's Prefect server."""


def uploads(proxy: FaultyProxy) -> int:
    return proxy.count("POST", "/api/v1/file/upload")


def test_upload_is_retried_on_503_until_it_succeeds(amqp_server: BkServer, proxy: FaultyProxy,
                                                    update_file: Callable[..., Path],
                                                    open_session: Callable[..., LeafSession]) -> None:
    federation = amqp_server.federation(leaves=2)
    proxy.inject("503", "/api/v1/file/upload", times=2)
    session = open_session(credentials_for(amqp_server, federation.leaves[0], AMQP, host=proxy.url))
    receipt = upload_weights.with_options(**FAST)(session, update_file(), 1, 1)
    assert receipt.file_id and uploads(proxy) == 3


def test_upload_whose_reply_was_lost_counts_once(amqp_server: BkServer, proxy: FaultyProxy,
                                                 update_file: Callable[..., Path],
                                                 open_session: Callable[..., LeafSession]) -> None:
    federation = amqp_server.federation(leaves=2)
    proxy.inject("drop-after", "/api/v1/file/upload", times=1)
    session = open_session(credentials_for(amqp_server, federation.leaves[0], AMQP, host=proxy.url))
    upload_weights.with_options(**FAST)(session, update_file(), 1, 1)
    assert uploads(proxy) == 2
    assert amqp_server.status(federation.branch_id)["rounds"][0]["updates"] == 1


def test_upload_is_not_retried_on_401(amqp_server: BkServer, proxy: FaultyProxy, update_file: Callable[..., Path],
                                      open_session: Callable[..., LeafSession]) -> None:
    leaf = amqp_server.federation(leaves=1).leaves[0]
    session = open_session(credentials_for(amqp_server, leaf | {"session_token": "wrong"}, AMQP, host=proxy.url))
    with pytest.raises(AuthenticationError, match="401"):
        upload_weights.with_options(**FAST)(session, update_file(), 1, 1)
    assert uploads(proxy) == 1


def test_rejected_archive_is_not_retried(amqp_server: BkServer, proxy: FaultyProxy, update_file: Callable[..., Path],
                                         model: Callable[[int], list],
                                         open_session: Callable[..., LeafSession]) -> None:
    federation = amqp_server.federation(leaves=3)
    first = open_session(credentials_for(amqp_server, federation.leaves[0], AMQP, host=proxy.url))
    second = open_session(credentials_for(amqp_server, federation.leaves[1], AMQP, host=proxy.url))
    upload_weights.with_options(**FAST)(first, update_file(0), 1, 1)
    with pytest.raises(ArchiveRejectedError, match="layers"):
        upload_weights.with_options(**FAST)(second, update_file(layers=model(1)[:1]), 1, 1)
    assert uploads(proxy) == 2


def test_upload_task_run_is_named_after_its_round(amqp_server: BkServer, update_file: Callable[..., Path],
                                                  prefect_api: str, open_session: Callable[..., LeafSession]) -> None:
    session = open_session(credentials_for(amqp_server, amqp_server.federation(leaves=2).leaves[0], AMQP))

    @flow
    def one_upload() -> str:
        future = upload_weights.submit(session, update_file(), 7, 1)
        future.result()
        return str(future.task_run_id)

    task_run_id = one_upload()
    deadline = time.monotonic() + 30
    while (response := httpx.get(f"{prefect_api}/task_runs/{task_run_id}", timeout=10)).status_code == 404:
        assert time.monotonic() < deadline, "the task run never reached the API"
        time.sleep(0.2)
    assert response.json()["name"] == "upload-round-7"


def test_wait_for_run_waits_while_paused_and_returns_at_start(server: BkServer,
                                                              open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1)
    server.run(federation.branch_id, "pause")
    threading.Timer(1.0, server.run, args=(federation.branch_id, "start")).start()
    details = wait_for_run(open_session(credentials_for(server, federation.leaves[0])), 1, poll_interval_s=0.5,
                           timeout_s=30)
    assert details.run_status == "start"


def test_wait_for_run_returns_stop_so_the_flow_can_end(server: BkServer,
                                                       open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1)
    server.run(federation.branch_id, "stop")
    assert wait_for_run(open_session(credentials_for(server, federation.leaves[0])), 1).run_status == "stop"


def test_polling_task_never_returns_a_cached_answer(server: BkServer, open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1)
    session = open_session(credentials_for(server, federation.leaves[0]))

    @flow(persist_result=True)
    def twice() -> tuple[int, int]:
        first = wait_for_run(session, 1).run_number
        server.run(federation.branch_id, "stop")
        server.run(federation.branch_id, "start")
        return first, wait_for_run(session, 1).run_number

    assert twice() == (1, 2)


def _uploaded_round_one(server: BkServer, update_file: Callable[..., Path],
                        open_session: Callable[..., LeafSession]) -> tuple[Federation, LeafSession]:
    """A two-leaf federation whose first leaf uploaded round 1, and that leaf's session."""
    federation = server.federation(leaves=2)
    session = open_session(credentials_for(server, federation.leaves[0]))
    upload_weights(session, update_file(), 1, 1)
    return federation, session


def test_waiting_for_aggregation_ends_when_the_run_stops(server: BkServer, update_file: Callable[..., Path],
                                                         open_session: Callable[..., LeafSession]) -> None:
    federation, session = _uploaded_round_one(server, update_file, open_session)
    threading.Timer(1.0, server.run, args=(federation.branch_id, "stop")).start()
    with pytest.raises(RunStoppedError):
        wait_for_aggregation(session, 1, 1, timeout_s=60, run_check_interval_s=0.5)


def test_a_stop_notice_ends_the_aggregation_wait_without_waiting_for_the_next_run_check(
        server: BkServer, update_file: Callable[..., Path], open_session: Callable[..., LeafSession]) -> None:
    """The run is checked when its status notice comes: the next scheduled check (10 minutes away)
    is after the wait's own timeout, which would end it as AggregationTimeoutError instead."""
    federation, session = _uploaded_round_one(server, update_file, open_session)
    threading.Timer(1.0, server.run, args=(federation.branch_id, "stop")).start()
    with pytest.raises(RunStoppedError):
        wait_for_aggregation(session, 1, 1, timeout_s=60, run_check_interval_s=600)


def _stop_and_await_its_notice(server: BkServer, federation: Federation, session: LeafSession) -> None:
    """Stop the federation's run and return once the leaf's listener has its status notice."""
    before = session.client.run_status_notices
    server.run(federation.branch_id, "stop")
    deadline = time.monotonic() + 30
    while session.client.run_status_notices == before:
        assert time.monotonic() < deadline, "the stop notice never reached the leaf's listener"
        time.sleep(0.05)


def test_a_stop_notice_between_upload_and_wait_ends_the_wait_at_once(
        server: BkServer, update_file: Callable[..., Path], open_session: Callable[..., LeafSession]) -> None:
    """The notice came before the wait began: the run is checked at once all the same."""
    federation, session = _uploaded_round_one(server, update_file, open_session)
    _stop_and_await_its_notice(server, federation, session)
    with pytest.raises(RunStoppedError):
        wait_for_aggregation(session, 1, 1, timeout_s=60, run_check_interval_s=600)


def _uploaded_statistics(server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path
                         ) -> tuple[Federation, LeafSession, UploadReceipt]:
    """A two-leaf federation whose first leaf uploaded statistics into round 1: a round that will
    not close."""
    federation = server.federation(leaves=2)
    session = open_session(credentials_for(server, federation.leaves[0]))
    archive = write_statistics(tmp_path / "statistics.npz", {"age": np.arange(10.0)})
    return federation, session, upload_statistics(session, archive, 1, 1)


def test_a_stop_notice_ends_the_statistics_wait_without_waiting_for_the_next_run_check(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    """As for an update: the next run check (10 minutes away) is after the wait's own timeout."""
    federation, session, receipt = _uploaded_statistics(server, open_session, tmp_path)
    threading.Timer(1.0, server.run, args=(federation.branch_id, "stop")).start()
    with pytest.raises(RunStoppedError):
        wait_for_statistics(session, 1, 1, receipt.counted_in, timeout_s=60, run_check_interval_s=600)


def test_a_stop_notice_between_statistics_upload_and_wait_ends_the_wait_at_once(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    """The notice came before the wait began: counted from the upload's mark, it has the run
    checked at once all the same."""
    federation, session, receipt = _uploaded_statistics(server, open_session, tmp_path)
    _stop_and_await_its_notice(server, federation, session)
    with pytest.raises(RunStoppedError):
        wait_for_statistics(session, 1, 1, receipt.counted_in, timeout_s=60, run_check_interval_s=600)


def test_waiting_for_aggregation_ends_when_a_new_run_begins(amqp_server: BkServer, update_file: Callable[..., Path],
                                                            open_session: Callable[..., LeafSession]) -> None:
    federation = amqp_server.federation(leaves=2)
    session = open_session(credentials_for(amqp_server, federation.leaves[0], AMQP))
    upload_weights(session, update_file(), 1, 1)
    amqp_server.run(federation.branch_id, "stop")
    amqp_server.run(federation.branch_id, "start")
    with pytest.raises(RunStoppedError, match="now run 2"):
        wait_for_aggregation(session, 1, 1, timeout_s=60, run_check_interval_s=0.5)
