"""What a failing test that started processes prints, so a CI failure reads from its output alone:
the tail of every log its processes wrote, and the flow runs of every Prefect server it started.

Both are found without the test's help: logs are the `*.log` files under the session's temporary
directory written since the test's module began; servers are this process's live descendants
running `prefect server start`, asked for their runs through the API their environment names.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import psutil

TAIL_LINES = 40
MOST_LOGS = 30
MOST_RUNS = 60


def log_tails(root: Path, since: float) -> str:
    """The last lines of each `*.log` under `root` modified at or after `since` (newest last); the
    empty ones named on one line, so that a module's many quiet servers do not bury the others."""
    found = {path: stat for path in root.rglob("*.log") if (stat := _stat(path)) is not None}
    logs = sorted((path for path, stat in found.items() if stat.st_mtime >= since), key=lambda p: found[p].st_mtime)
    empty = [str(path.relative_to(root)) for path in logs if found[path].st_size == 0]
    parts = [f"==> empty: {', '.join(empty)} <=="] if empty else []
    for path in [path for path in logs if found[path].st_size > 0][-MOST_LOGS:]:
        lines = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        parts.append(f"==> {path.relative_to(root)} (last {len(lines)} lines) <==\n" + "\n".join(lines))
    return "\n\n".join(parts)


def _stat(path: Path) -> os.stat_result | None:
    """A log file's size and time, None for a file removed since it was listed (or not a file)."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found if stat.S_ISREG(found.st_mode) else None


def _flow_runs(api: str) -> list[dict[str, Any]]:
    """The first flow runs of the server at `api`; ValueError with what it answered instead (a
    server in trouble answers an error body, which is itself worth reading)."""
    reply = httpx.post(f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC", "limit": MOST_RUNS},
                       timeout=10)
    runs = reply.json() if reply.is_success else None
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise ValueError(f"HTTP {reply.status_code}: {reply.text[:1000]}")
    return runs


def _prefect_apis() -> list[str]:
    """The API URLs of the Prefect servers among this process's live descendants."""
    apis = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = child.cmdline()
            if not ("server" in command and "start" in command and any(p.endswith("prefect") for p in command)):
                continue
            environ = child.environ()
            port = command[command.index("--port") + 1] if "--port" in command[:-1] else "4200"
            api = environ.get("PREFECT_UI_API_URL") or environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
            if api not in apis:
                apis.append(api)
    return apis


def flow_run_states() -> str:
    """Each started Prefect server's flow runs: name, deployment, state and its message."""
    parts = []
    for api in _prefect_apis():
        try:
            runs = _flow_runs(api)
        except (httpx.HTTPError, ValueError) as error:
            parts.append(f"==> flow runs at {api}: not readable ({error}) <==")
            continue
        lines = [f"{run['name']:<28} deployment={run.get('deployment_id')} state={run.get('state_name')} "
                 f"start={run.get('start_time')} end={run.get('end_time')} "
                 f"message={(run.get('state') or {}).get('message')!r}" for run in runs]
        parts.append(f"==> flow runs at {api} ({len(runs)}) <==\n" + "\n".join(lines))
    return "\n\n".join(parts)
