"""The demo as a newcomer runs it (`make demo`), and its dashboard as a browser renders it.

The demo runs as a real process group (make, its own Prefect server and bk-server), and
is interrupted as a terminal's Ctrl-C does it: SIGINT to the whole group. The dashboard is
checked in Debian's headless Chromium on the Prefect UI's artifact page: the DOM after
the page's scripts ran, not the API.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_branchkey.flows.leaf.history import history_rows

from ..support.browser import render
from ..support.process_helpers import left_running, new_marker, processes_with

PROJECT = Path(__file__).resolve().parents[2]
ROUNDS = 3

class Demo:
    """`make demo` in a process group of its own, its output read line by line."""

    def __init__(self, base: Path, *args: str, transport: str = "websocket") -> None:
        self.marker = new_marker()
        env = {**os.environ, self.marker[0]: self.marker[1], "BK_DEMO_TRANSPORT": transport}
        demo_args = " ".join(["--dir", str(base), *args])
        self.process = subprocess.Popen(["make", "--no-print-directory", "demo", f"DEMO_ARGS={demo_args}"],
                                        cwd=PROJECT, env=env, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []

    def read_until(self, pattern: str) -> re.Match[str]:
        """Read output until a line matches; fail with the output so far if the demo ends first."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"the demo ended (exit {self.process.wait()}) before {pattern!r}:\n{''.join(self.lines)}")

    def interrupt(self) -> str:
        """Ctrl-C, as a terminal sends it (SIGINT to the foreground group); what the demo said after it."""
        os.killpg(self.process.pid, signal.SIGINT)
        rest, _ = self.process.communicate(timeout=90)
        return rest

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in processes_with(self.marker):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo directory for the module's runs: a rerun must not clash with the run before."""
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def finished_demo(demo_dir: Path) -> Iterator[tuple[Demo, str]]:
    """A short demo that finished its rounds and keeps its servers up; the federation history page."""
    demo = Demo(demo_dir, "--rounds", str(ROUNDS))
    try:
        url = demo.read_until(r"federation history \(every leaf per round\): (\S+)").group(1)
        demo.read_until("Ctrl-C stops them")
        yield demo, url
    finally:
        demo.kill()


def test_demo_accuracy_rises_across_rounds(finished_demo: tuple[Demo, str]) -> None:
    demo, _ = finished_demo
    means = [float(m.group(1)) for line in demo.lines
             if (m := re.search(r"done by every leaf, mean global model accuracy ([0-9.]+)", line))]
    assert len(means) == ROUNDS and means[-1] > means[0], means


def test_demo_runs_its_prefect_server_on_postgresql_without_lock_errors(finished_demo: tuple[Demo, str]) -> None:
    demo, _ = finished_demo
    run_dir = Path(next(m.group(1) for line in demo.lines if (m := re.search(r"^Demo in (\S+):", line))))
    assert any("(embedded PostgreSQL)" in line for line in demo.lines)
    assert (run_dir / "prefect" / "postgres" / "data" / "PG_VERSION").exists()
    assert not (run_dir / "prefect" / "prefect.db").exists()
    assert "database is locked" not in (run_dir / "prefect" / "server.log").read_text()


@pytest.mark.browser
def test_dashboard_renders_the_federation_history_rows(finished_demo: tuple[Demo, str], chromium: str,
                                                      tmp_path: Path) -> None:
    _, url = finished_demo
    dom = render(chromium, url, tmp_path, "federation-history.png", expect="mean accuracy")
    rows = re.findall(r"<tr\b.*?</tr>", dom, flags=re.S)
    body = [row for row in rows if "<td" in row]
    assert len(body) == ROUNDS, f"{len(body)} table rows rendered; DOM in {tmp_path}"
    for round_number, row in enumerate(body, start=1):
        cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td\b.*?</td>", row, flags=re.S)]
        assert str(round_number) in cells and any(re.fullmatch(r"0\.\d+", c) for c in cells), cells
    assert "digits-leaf-1 accuracy" in dom and "mean accuracy" in dom


def page_url(demo: Demo, label: str) -> str:
    """The dashboard URL the demo printed under `label`."""
    return next(m.group(1) for line in demo.lines if (m := re.search(rf"{re.escape(label)}: (\S+)", line)))


@pytest.mark.browser
def test_dashboard_titles_the_federation_summary_with_the_branch_name(finished_demo: tuple[Demo, str],
                                                                      chromium: str, tmp_path: Path) -> None:
    demo, _ = finished_demo
    dom = render(chromium, page_url(demo, "federation summary (accuracy chart)"), tmp_path, "federation-summary.png",
                 expect="Federation digits")
    assert "Federation digits" in dom, f"DOM in {tmp_path}"


@pytest.mark.browser
def test_dashboard_shows_the_best_round_in_a_leafs_summary(finished_demo: tuple[Demo, str], chromium: str,
                                                           tmp_path: Path) -> None:
    demo, _ = finished_demo
    dom = render(chromium, page_url(demo, "digits-leaf-1 summary (best round)"), tmp_path, "leaf-summary.png",
                 expect="Best global model")
    assert re.search(r"Best global model:.{0,40}round \d+ of run \d+", dom, flags=re.S), f"DOM in {tmp_path}"


@pytest.mark.browser
def test_dashboard_shows_the_global_models_materialization_and_its_upstream_update(
        finished_demo: tuple[Demo, str], chromium: str, tmp_path: Path) -> None:
    demo, _ = finished_demo
    dom = render(chromium, page_url(demo, "global model asset (latest materialization and its upstream updates)"),
                 tmp_path, "global-model-asset.png", expect="/global-model")
    assert "prefect.asset.materialization.succeeded" in dom and "/global-model" in dom, f"DOM in {tmp_path}"
    assert re.search(r"/leaves/[0-9a-f-]+/update", dom), "the upstream update asset is shown"


def test_ctrl_c_after_the_demo_stops_every_server(finished_demo: tuple[Demo, str]) -> None:
    demo, _ = finished_demo
    assert "Stopping the demo" in demo.interrupt()
    assert left_running(demo.marker) == []


@pytest.fixture(scope="module")
def amqp_dp_demo(demo_dir: Path, rabbitmq: None) -> Iterator[tuple[Demo, str]]:
    """A two-round demo over AMQP with differential privacy and `--no-keep`, run to its end (after
    its statistics round, a run of its own); its output. One run shows both options, and that they combine."""
    demo = Demo(demo_dir, "--rounds", "2", "--no-keep", "--dp", "1.0", "0.1", transport="amqp")
    try:
        output, _ = demo.process.communicate(timeout=300)
        assert demo.process.returncode == 0, output
        yield demo, output
    finally:
        demo.kill()


def test_amqp_demo_with_no_keep_finishes_and_stops_everything(amqp_dp_demo: tuple[Demo, str]) -> None:
    demo, output = amqp_dp_demo
    assert "(amqp notifications)" in output and "2 rounds in" in output
    assert left_running(demo.marker) == []


def test_demo_with_dp_prints_epsilon_beside_accuracy_and_records_it(amqp_dp_demo: tuple[Demo, str]) -> None:
    _, output = amqp_dp_demo
    assert "epsilon" in output and "2 rounds in" in output
    run = Path(next(m.group(1) for line in output.splitlines() if (m := re.search(r"^Demo in (\S+):", line))))
    for leaf in sorted(p for p in (run / "leaves").iterdir() if p.is_dir()):
        epsilons = [row["dp_epsilon"] for row in history_rows(leaf)]
        assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1], leaf.name


def test_ctrl_c_in_the_middle_of_a_round_leaves_nothing_running(demo_dir: Path) -> None:
    demo = Demo(demo_dir, "--rounds", "20", "--no-statistics")
    try:
        demo.read_until(r"round 1 of 20 done by every leaf")
        assert any(b"pginstall/bin/postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
                   for pid in processes_with(demo.marker)), "the demo's PostgreSQL runs (and must stop)"
        assert "Stopping the demo" in demo.interrupt()
        assert left_running(demo.marker) == []
    finally:
        demo.kill()


def test_a_rerun_gets_servers_and_files_of_its_own(demo_dir: Path) -> None:
    runs = sorted(demo_dir.iterdir())
    assert len(runs) >= 2, "the finished demo, the interrupted one (and the AMQP one, with a broker)"
    for run in runs:
        assert (run / "prefect" / "server.log").exists() and (run / "platform" / "data" / "admin.json").exists()
    logs = [(run / "prefect" / "server.log").read_text() for run in runs]
    ports = {match.group(1) for log in logs if (match := re.search(r"dashboard at http://127\.0\.0\.1:(\d+)", log))}
    assert len(ports) == len(runs), "each run had a Prefect server of its own"
