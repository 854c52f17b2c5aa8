"""Shared fixtures: real bk_server processes, with and without RabbitMQ, and update archives; and
what a failing test prints of the processes it started.

Under pytest-xdist each worker is its own session: its own Prefect server (`prefect_api`), its own
PREFECT_HOME beneath the run's, its own temporary directories; ports are free ones.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Set before Prefect is imported: its settings are read once, and workers must not share a home.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] = str(Path(os.environ["PREFECT_HOME"]) / os.environ["PYTEST_XDIST_WORKER"])

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.archive import write_update
from prefect_branchkey.tasks import LeafSession

from .e2e.faults.summary import pytest_runtest_logreport, pytest_terminal_summary
from .support.bkserver import BkServer, broker_available, in_ci
from .support.browser import find_chromium
from .support.failure_report import flow_run_states, log_tails
from .support.worker_groups import shared_fixture_groups

__all__ = ["pytest_runtest_logreport", "pytest_terminal_summary"]  # the fault suite's table, a hook on the controller


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (`--dist loadgroup`)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests sharing a module-scoped fixture's instance run on one worker, which makes it once."""
    groups = shared_fixture_groups(items)
    for item in items:
        if item.nodeid in groups:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))


# When the current module's first test began: a failing test shows the logs written since.
_MODULE_STARTED: dict[str, float] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    _MODULE_STARTED.setdefault(item.module.__name__ if item.module else "", time.time() - 1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that started processes carries their logs' tails and its Prefect runs' states."""
    report: pytest.TestReport = yield
    if report.failed and "unit" not in item.path.parts:
        since = _MODULE_STARTED.get(item.module.__name__ if item.module else "", time.time() - 600)
        root = item.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        for title, make in (("process logs (tails)", lambda: log_tails(root, since)),
                            ("Prefect flow runs", flow_run_states)):
            try:
                if text := make():
                    report.sections.append((title, text))
            except Exception as error:  # the report must never end the run it reports on
                report.sections.append((title, f"could not be made: {error!r}"))
    return report


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prefect server on an embedded PostgreSQL for the whole session (`prefect server start`,
    as the demo runs it), the API for this process and its children."""
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer

    with LocalPrefectServer(tmp_path_factory.mktemp("prefect-server"), database="postgres") as server:
        os.environ["PREFECT_API_URL"] = server.api_url
        with (temporary_settings(updates={PREFECT_API_URL: server.api_url}),
              prefect.context._temporary_global_settings_context(prefect.context.get_settings_context())):
            try:
                yield server.api_url
            finally:
                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
                os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture
def forked_dask_workers() -> Iterator[None]:
    """Dask worker processes forked from the test worker's fork server, which has imported Prefect
    and our flows once, instead of each spawned interpreter importing them again."""
    from .support.forkserver import dask_workers_forked

    with dask_workers_forked():
        yield


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium, for the tests that render the Prefect UI."""
    return find_chromium()


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    """A RabbitMQ broker on 127.0.0.1; a failure in CI, a loud skip elsewhere."""
    if broker_available():
        return
    message = "RabbitMQ is not running on 127.0.0.1:5672 with its management API on 15672"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing broker is a failure; .ci/run starts it)")
    warnings.warn(f"SKIPPING broker tests: {message}. Run `make broker` or .ci/run.", stacklevel=1)
    pytest.skip(message)


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., BkServer]]:
    """Start bk_server processes for one test; all are stopped (and broker state removed) after it."""
    started: list[BkServer] = []

    def start(amqp: bool = False, **options: object) -> BkServer:
        data_dir = tmp_path_factory.mktemp("bk") / "data"
        server = BkServer(data_dir, amqp=amqp, options=options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        if server.amqp:
            server.cleanup_broker()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BkServer]:
    """A server notifying over WebSocket only, shared by a module's tests: each makes federations
    of its own. A test that restarts its server, or measures it, starts its own with `make_server`."""
    started = BkServer(tmp_path_factory.mktemp("bk") / "data").start()
    yield started
    started.stop()


@pytest.fixture
def amqp_server(rabbitmq: None, make_server: Callable[..., BkServer]) -> BkServer:
    """A server that also provisions leaves on RabbitMQ and publishes there."""
    return make_server(amqp=True)


@pytest.fixture
def model() -> Callable[[int], list[np.ndarray]]:
    """A small model whose parameters depend on a seed: float32, float16, int64 and bool layers."""

    def make(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [
            rng.normal(size=(16, 8)).astype(np.float32),
            rng.normal(size=(8,)).astype(np.float16),
            np.array([seed * 10, 7], dtype=np.int64),
            np.array([seed % 2 == 0, True]),
        ]

    return make


@pytest.fixture
def update_file(tmp_path: Path, model: Callable[[int], list[np.ndarray]]) -> Callable[..., Path]:
    """Write an update archive for a seed and weighting; returns its path."""
    counter = iter(range(1_000_000))

    def make(seed: int = 0, weighting: float = 100.0, layers: list[np.ndarray] | None = None, **kwargs: object) -> Path:
        return write_update(tmp_path / f"update-{next(counter)}.npz", weighting,
                            layers if layers is not None else model(seed), **kwargs)

    return make


@pytest.fixture
def open_session() -> Iterator[Callable[[BranchKeyCredentials], LeafSession]]:
    """Open a leaf's session (its client and marks) for a test; all are closed after it."""
    sessions: list[LeafSession] = []

    def open_one(credentials: BranchKeyCredentials) -> LeafSession:
        sessions.append(LeafSession(credentials))
        return sessions[-1]

    yield open_one
    for session in sessions:
        session.close()


@pytest.fixture(params=["websocket", "amqp"])
def transport_server(request: pytest.FixtureRequest, make_server: Callable[..., BkServer]) -> tuple[str, BkServer]:
    """A server and the notification transport to use with it: each test runs once per transport."""
    if request.param == "amqp":
        request.getfixturevalue("rabbitmq")
    return request.param, make_server(amqp=request.param == "amqp")
