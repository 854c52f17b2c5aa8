"""The simulation tests' platform: one of each test's own, not the module's. Each simulation runs for
seconds to tens of seconds, so under pytest-xdist they spread over the workers instead of queueing
on the one that holds a module's server."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ...support.bkserver import BkServer


@pytest.fixture
def server(make_server: Callable[..., BkServer]) -> BkServer:
    """A platform notifying over WebSocket, started for this test alone."""
    return make_server()
