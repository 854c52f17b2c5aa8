"""The demo federation (`make demo`): a local bk_server, three leaves, five rounds of digits.

Starts `bk-server` on a free loopback port (with RabbitMQ if one is running, else
WebSocket only), creates a tree with three leaves, and runs `federated-simulation`: three
`federated-training` flow runs in parallel, visible in the Prefect UI when PREFECT_API_URL
points at a server (`prefect server start`). Prints each leaf's history at the end.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


from bk_server.cli import write_credentials
from bk_server.process import LocalServer, broker_available

from .cli import history
from .simulation import federated_simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo-data"), help="where the demo keeps everything")
    parser.add_argument("--leaves", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transport", choices=("auto", "amqp", "websocket"), default="auto")
    args = parser.parse_args()
    transport = args.transport if args.transport != "auto" else ("amqp" if broker_available() else "websocket")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    amqp_url = "amqp://guest:guest@127.0.0.1:5672/" if transport == "amqp" else None
    with LocalServer(args.dir / "server", amqp_url=amqp_url) as server:
        data = server.create_federation(args.leaves, tree="demo", branch="digits")
        write_credentials(args.dir / "credentials", data["leaves"])
        print(f"bk-server on {server.url}, {args.leaves} leaves, notifications over {transport}")
        federated_simulation(server.url, str(args.dir / "credentials"), str(args.dir / "leaves"),
                             rounds=args.rounds, transport=transport, amqp_host="127.0.0.1")
    for leaf_dir in sorted((args.dir / "leaves").iterdir()):
        history(work_dir=leaf_dir)


if __name__ == "__main__":
    main()
