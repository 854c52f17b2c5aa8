"""Call a bk-server's admin API (`/admin/v1`): what `bk-server run/status` and the dev tooling use."""

from __future__ import annotations

import functools
import ssl
from typing import Any

import httpx

from prefect_branchkey.bk_blocks.errors import error_for_response


class AdminCallError(RuntimeError):
    """The admin API could not be reached or refused the call."""


@functools.cache
def _default_trust() -> ssl.SSLContext:
    """httpx's default verification (certifi's CAs, or `SSL_CERT_FILE`/`SSL_CERT_DIR` as the process
    started with), built once per process: building it takes about 20 ms of CPU, which a caller
    polling the admin API paid on every call."""
    return httpx.create_ssl_context()


def admin_call(base_url: str, token: str, method: str, path: str, body: dict[str, Any] | None = None,
               verify: ssl.SSLContext | bool = True) -> Any:
    """Call `/admin/v1<path>` and return its `data`, or raise AdminCallError with the server's message.
    `verify`: how an https:// server's certificate is checked (default: the system's CAs, or `SSL_CERT_FILE`)."""
    url = f"{base_url.rstrip('/')}/admin/v1{path}"
    try:
        response = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                 verify=_default_trust() if verify is True else verify)
    except httpx.HTTPError as exc:
        raise AdminCallError(f"cannot reach the server at {base_url}: {exc}") from exc
    if response.status_code >= 400:
        raise AdminCallError(str(error_for_response(response.status_code, response.content, response.reason_phrase,
                                                    "server")))
    return response.json()["data"]
