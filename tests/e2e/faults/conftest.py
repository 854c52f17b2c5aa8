"""The fault suite's fixtures, and its outcomes carried to the summary table (summary.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .federation import FaultFederation, Outcome
from .summary import attach

# Outcomes the running test recorded, not yet on its report.
_RECORDED: list[Outcome] = []


@pytest.fixture(params=["websocket", "amqp"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each fault runs once per notification transport (AMQP needs the broker)."""
    if request.param == "amqp":
        request.getfixturevalue("rabbitmq")
    return str(request.param)


@pytest.fixture
def make_federation(tmp_path: Path, prefect_api: str) -> Iterator[Callable[..., FaultFederation]]:
    """Start a FaultFederation (stopped, its broker objects removed, after the test)."""
    made: list[FaultFederation] = []

    def make(transport: str, **options: object) -> FaultFederation:
        federation = FaultFederation(tmp_path / f"federation-{len(made) + 1}", transport, prefect_api,
                                     **options)  # type: ignore[arg-type]
        made.append(federation)
        return federation

    yield make
    for federation in made:
        federation.stop()


def record(outcome: Outcome) -> Outcome:
    """Keep the outcome for the summary, then fail the test if the fault did any harm."""
    _RECORDED.append(outcome)
    assert outcome.survived and outcome.lost == 0 and outcome.double_counted == 0, "\n".join(outcome.problems)
    return outcome


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Move the outcomes the test recorded onto its report, for the summary table."""
    try:
        return (yield)
    finally:
        while _RECORDED:
            attach(item, _RECORDED.pop(0))
