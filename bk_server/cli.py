"""`bk-server`: serve the local platform, create federations, control runs."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Literal

import uvicorn
from cyclopts import App, Parameter
from uvicorn.config import STARTUP_FAILURE

from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.bk_server.admin_client import AdminCallError, admin_call
from prefect_branchkey.bk_server.app import create_app, write_admin_file
from prefect_branchkey.bk_server.platform import new_secret
from prefect_branchkey.bk_server.settings import ServerSettings

app = App(name="bk-server", help="A local BranchKey-compatible platform for development, tests and demos.")
federation_app = App(name="federation", help="Create federations (a tree, a branch and its leaves).")
run_app = App(name="run", help="Start, pause or stop a branch's run.")
app.command(federation_app)
app.command(run_app)


@app.command
def serve(
    *,
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    amqp_url: str | None = None,
    rabbitmq_admin_url: str | None = None,
    ws_ping_interval: float = 30.0,
    max_upload_bytes: int = 4 * 1024**3,
    max_decompressed_bytes: int = 8 * 1024**3,
    download_url_ttl: float = 300.0,
    ws_ticket_ttl: float = 30.0,
    extensions: bool = True,
    ssl_certfile: Path | None = None,
    ssl_keyfile: Path | None = None,
    log_level: str = "info",
) -> None:
    """Serve the platform's API on HOST:PORT, keeping its state in DATA_DIR.

    Parameters
    ----------
    data_dir
        Where the database, archives and admin token live (created owner-only). Its admin.json
        (the server's URL and admin token) is written once the port is bound.
    port
        The port to listen on; 0 takes a free one, which admin.json's URL names.
    amqp_url
        RabbitMQ to publish notifications to, e.g. amqp://guest:guest@127.0.0.1:5672/.
        Without it notifications go over WebSocket only.
    rabbitmq_admin_url
        RabbitMQ management API for provisioning leaves; derived from amqp_url if omitted.
    ws_ping_interval
        Seconds between the server's WebSocket pings (the protocol says 30).
    max_upload_bytes
        Largest archive accepted, in bytes (413 above it).
    max_decompressed_bytes
        Largest decompressed archive accepted (a zip bomb is refused before it inflates).
    download_url_ttl
        Seconds a pre-signed download URL stays valid.
    ws_ticket_ttl
        Seconds a WebSocket ticket stays valid (it is also single-use).
    extensions
        Say more than the official platform (the open round and latest aggregation in run
        details, the round in upload replies and notices, error codes) and refuse an upload
        for a closed round. --no-extensions answers exactly as the official platform does.
    ssl_certfile
        Serve HTTPS (and wss://) with this PEM certificate chain; needs --ssl-keyfile. Clients
        verify it against their CA bundle (the Block's ca_bundle; `SSL_CERT_FILE` for the
        admin commands of this CLI).
    ssl_keyfile
        The PEM private key of --ssl-certfile.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise AdminCallError("give both --ssl-certfile and --ssl-keyfile to serve HTTPS, or neither")
    settings = ServerSettings(
        data_dir=data_dir.resolve(), amqp_url=amqp_url, rabbitmq_admin_url=rabbitmq_admin_url,
        max_upload_bytes=max_upload_bytes, max_decompressed_bytes=max_decompressed_bytes,
        download_url_ttl_s=download_url_ttl, ws_ticket_ttl_s=ws_ticket_ttl, extensions=extensions,
    )
    settings.make_dirs()
    token = new_secret()
    config = uvicorn.Config(
        create_app(settings, admin_token=token), host=host, port=port, log_level=log_level,
        ws_ping_interval=ws_ping_interval, ws_ping_timeout=ws_ping_interval, timeout_graceful_shutdown=5,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None, ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
    )
    # Bound before admin.json is written: whoever reads the file finds this process on its port
    # (port 0 takes a free one, with no window in which another process could take it first).
    sock = config.bind_socket()
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    scheme = "https" if ssl_certfile else "http"
    write_admin_file(settings.admin_file, f"{scheme}://{shown_host}:{sock.getsockname()[1]}", token)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the platform's terminal stops it: status 0
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _admin_target(data_dir: Path | None, server: str | None, admin_token: str | None) -> tuple[str, str]:
    if server and admin_token:
        return server.rstrip("/"), admin_token
    if data_dir is None:
        raise AdminCallError("give --data-dir of a running server, or --server and --admin-token")
    admin_file = data_dir / "admin.json"
    if not admin_file.exists():
        raise AdminCallError(f"{admin_file} not found: is `bk-server serve --data-dir {data_dir}` running?")
    info = json.loads(admin_file.read_text())
    return (server or info["url"]).rstrip("/"), admin_token or info["admin_token"]


def write_credentials(out: Path, leaves: list[dict[str, str]]) -> list[Path]:
    """One official-format credentials JSON per leaf, readable only by the owner."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for leaf in leaves:
        path = out / f"{leaf['name']}.json"
        with atomic_write(path, "w") as handle:
            json.dump(leaf, handle, indent=2)
        paths.append(path)
    return paths


@federation_app.command(name="create")
def federation_create(
    *,
    leaves: int,
    min_updates: int,
    out: Path,
    data_dir: Path | None = None,
    tree: str = "tree",
    branch: str = "main",
    quorum: int | None = None,
    round_deadline: Annotated[float | None, Parameter(name="--round-deadline")] = None,
    server: str | None = None,
    admin_token: str | None = None,
) -> None:
    """Create a tree, a branch and LEAVES leaves, start its run, write credentials to OUT.

    Parameters
    ----------
    branch
        The branch's name; its leaves are named `<branch>-leaf-<n>` and their credentials
        written to OUT/`<branch>-leaf-<n>`.json.
    min_updates
        Distinct leaves whose updates close a round.
    quorum
        With --round-deadline: leaves enough to close a round once the deadline passed.
    round_deadline
        Seconds after a round opens at which it closes if it has a quorum.
    """
    url, token = _admin_target(data_dir, server, admin_token)
    body = {"leaves": leaves, "min_updates": min_updates, "tree": tree, "branch": branch,
            "quorum": quorum, "round_deadline_s": round_deadline}
    data = admin_call(url, token, "POST", "/federations", body)
    paths = write_credentials(out, data["leaves"])
    print(json.dumps({"tree_id": data["tree_id"], "branch_id": data["branch_id"],
                      "credentials": [str(p) for p in paths]}, indent=2))


@run_app.default
def run_control(
    action: Literal["start", "pause", "stop"],
    *,
    branch: str,
    data_dir: Path | None = None,
    server: str | None = None,
    admin_token: str | None = None,
) -> None:
    """Start, pause or stop BRANCH's run; every leaf is notified."""
    url, token = _admin_target(data_dir, server, admin_token)
    print(json.dumps(admin_call(url, token, "POST", f"/branches/{branch}/run/{action}")))


@app.command
def status(*, branch: str, data_dir: Path | None = None, server: str | None = None,
           admin_token: str | None = None) -> None:
    """Print a branch's run, rounds and metrics as JSON."""
    url, token = _admin_target(data_dir, server, admin_token)
    print(json.dumps(admin_call(url, token, "GET", f"/branches/{branch}"), indent=2))


@app.command
def fields(*assignments: str, branch: str, data_dir: Path | None = None, server: str | None = None,
           admin_token: str | None = None) -> None:
    """Assign the operations that combine BRANCH's named analytics fields, replacing earlier ones:
    `n_cases=sum`, `lowest=min`, `highest=max`, `site_kind=must_match`, `spacing=mean:n_cases`
    (a mean weighted by a count field). Bundle entries (`<col>_n` ...) need none."""
    url, token = _admin_target(data_dir, server, admin_token)
    body: dict[str, object] = {}
    for assignment in assignments:
        name, sep, operation = assignment.partition("=")
        if not sep or not name or not operation:
            raise AdminCallError(f"assignment must be FIELD=OPERATION, got {assignment!r}")
        op, _, weight = operation.partition(":")
        body[name] = {"op": op, "weight": weight} if weight else op
    print(json.dumps(admin_call(url, token, "PUT", f"/branches/{branch}/fields", {"fields": body})))


def main() -> None:
    try:
        app()
    except AdminCallError as exc:
        print(f"bk-server: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
