"""The fault suite's summary table, printed at the end of the session.

Each fault test's outcome travels on its report (`user_properties`), so the table is whole when
the suite runs in parallel workers: the hooks here run where the terminal is, on pytest-xdist's
controller as in a single process (tests/conftest.py registers them, a conftest every run loads).
"""

from __future__ import annotations

import dataclasses

import pytest

from .federation import Outcome

PROPERTY = "fault_outcome"
# The outcomes reported so far, in the order their tests finished.
OUTCOMES: list[Outcome] = []


def attach(item: pytest.Item, outcome: Outcome) -> None:
    """Carry the outcome on the test's report."""
    item.user_properties.append((PROPERTY, dataclasses.asdict(outcome)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the outcomes from the call's report (the teardown's carries the same properties)."""
    if report.when == "call":
        OUTCOMES.extend(Outcome(**value) for name, value in report.user_properties if name == PROPERTY)


def _seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not OUTCOMES or hasattr(terminalreporter.config, "workerinput"):
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
