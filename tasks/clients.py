"""One long-lived BranchKeyClient per leaf in a process, shared by the tasks of a flow run.

The notification listener must be running before an upload so that the aggregation
answering it is recognised; keeping one client per leaf across tasks makes that so.
"""

from __future__ import annotations

import logging
import threading

from bk_blocks import BranchKeyClient, BranchKeyCredentials, BranchKeySettings

# The credentials parameter that means: read BRANCHKEY_* settings on the machine that runs the flow.
FROM_ENVIRONMENT = "$env"

_clients: dict[tuple[str, str, str], BranchKeyClient] = {}
_lock = threading.Lock()


def resolve_credentials(credentials: BranchKeyCredentials | str) -> BranchKeyCredentials:
    """The Block itself, the saved Block of that name, or, for `"$env"`, the Block that the
    `BRANCHKEY_*` environment of this machine describes (the token never leaves the machine)."""
    if isinstance(credentials, BranchKeyCredentials):
        return credentials
    if credentials == FROM_ENVIRONMENT:
        return BranchKeySettings().to_block()
    return BranchKeyCredentials.load(credentials)


def shared_client(
    credentials: BranchKeyCredentials | str, logger: logging.Logger | logging.LoggerAdapter | None = None
) -> BranchKeyClient:
    """The process's client for this leaf (created on first use), logging to `logger`."""
    block = resolve_credentials(credentials)
    key = (block.leaf_id, block.host, block.notification_transport)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = block.get_client()
    if logger is not None:
        client.log = logger
    return client


def has_shared_client(credentials: BranchKeyCredentials) -> bool:
    """Whether this process already has a client for the leaf (an enclosing flow run opened it)."""
    with _lock:
        return (credentials.leaf_id, credentials.host, credentials.notification_transport) in _clients


def close_shared_client(credentials: BranchKeyCredentials) -> None:
    """Close this leaf's shared client, if there is one (at the end of its flow run)."""
    with _lock:
        client = _clients.pop((credentials.leaf_id, credentials.host, credentials.notification_transport), None)
    if client is not None:
        client.close()


def close_shared_clients() -> None:
    """Close every shared client (at the end of a flow run)."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()
