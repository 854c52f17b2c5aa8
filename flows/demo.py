"""The demo federation (`make demo`): a local bk_server, three leaves, five rounds of digits.

Starts `bk-server` on a free loopback port (with RabbitMQ if one is running, else
WebSocket only), creates a tree with three leaves, and runs `federated-simulation`: three
`federated-training` flow runs in parallel, visible in the Prefect UI when PREFECT_API_URL
points at a server (`prefect server start`). Prints each leaf's history at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bk_server.cli import write_credentials

from .cli import history
from .simulation import federated_simulation


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _broker_running() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            pass
        return httpx.get("http://127.0.0.1:15672/api/overview", auth=("guest", "guest"), timeout=2).is_success
    except (OSError, httpx.HTTPError):
        return False


def _start_server(data_dir: Path, port: int, amqp: bool, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "bk_server.cli", "serve", "--data-dir", str(data_dir), "--port", str(port),
               "--log-level", "warning"]
    if amqp:
        command += ["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/"]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"bk-server did not start; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo-data"), help="where the demo keeps everything")
    parser.add_argument("--leaves", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transport", choices=("auto", "amqp", "websocket"), default="auto")
    args = parser.parse_args()
    transport = args.transport if args.transport != "auto" else ("amqp" if _broker_running() else "websocket")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    port = _free_port()
    server = _start_server(args.dir / "server", port, transport == "amqp", args.dir / "bk-server.log")
    try:
        admin = json.loads((args.dir / "server" / "admin.json").read_text())
        response = httpx.post(f"{admin['url']}/admin/v1/federations", timeout=60,
                              headers={"Authorization": f"Bearer {admin['admin_token']}"},
                              json={"leaves": args.leaves, "min_updates": args.leaves, "tree": "demo", "branch": "digits"})
        response.raise_for_status()
        write_credentials(args.dir / "credentials", response.json()["data"]["leaves"])
        print(f"bk-server on {admin['url']}, {args.leaves} leaves, notifications over {transport}")
        federated_simulation(admin["url"], str(args.dir / "credentials"), str(args.dir / "leaves"),
                             rounds=args.rounds, transport=transport, amqp_host="127.0.0.1")
    finally:
        server.terminate()
        server.wait(timeout=30)
    for leaf_dir in sorted((args.dir / "leaves").iterdir()):
        history(work_dir=leaf_dir)


if __name__ == "__main__":
    main()
