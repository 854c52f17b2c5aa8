"""The fault suite's fixtures and its summary table, printed at the end of the session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .federation import FaultFederation, Outcome

OUTCOMES: list[Outcome] = []


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
    OUTCOMES.append(outcome)
    assert outcome.survived and outcome.lost == 0 and outcome.double_counted == 0, "\n".join(outcome.problems)
    return outcome


def _seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not OUTCOMES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault suite")
    write("recovery: from the fault to the next aggregation; finished: to every leaf done "
          "(- : none after the fault); reruns: leaf runs that ended badly (the kill included) and were run again")
    write(f"{'fault':66} {'transport':9} {'survived':8} {'lost':>4} {'double':>6} {'reruns':>6} {'recovery s':>10} "
          f"{'finished s':>10}")
    for o in OUTCOMES:
        write(f"{o.fault:66} {o.transport:9} {'yes' if o.survived else 'NO':8} {o.lost:>4} {o.double_counted:>6} "
              f"{o.reruns:>6} {_seconds(o.recovery_s):>10} {_seconds(o.finished_s):>10}")
    survived = sum(o.survived for o in OUTCOMES)
    write(f"{len(OUTCOMES)} faults, {survived} survived, {sum(o.lost for o in OUTCOMES)} updates lost, "
          f"{sum(o.double_counted for o in OUTCOMES)} counted wrongly")
