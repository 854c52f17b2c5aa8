"""Shared fixtures: real bk_server processes, with and without RabbitMQ, and update archives."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.archive import write_update
from prefect_branchkey.tasks import LeafSession

from .support.bkserver import BkServer, broker_available, in_ci
from .support.browser import find_chromium


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


@pytest.fixture
def server(make_server: Callable[..., BkServer]) -> BkServer:
    """A server notifying over WebSocket only."""
    return make_server()


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
