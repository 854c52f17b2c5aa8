"""MLflow request authentication for a leaf's model registry, without its secrets in the environment.

MLflow reads a tracking server's password or token from `MLFLOW_TRACKING_*` environment variables,
which every process the leaf starts would inherit. Instead, this package declares a request-auth
provider under MLflow's `mlflow.request_auth_provider` entry point, named `branchkey-registry`:
selected by `MLFLOW_TRACKING_AUTH` (a name, not a secret), it adds the `Authorization` header that
`granted` holds, in the context (thread) of the registration alone, and only to requests for the
tracking server it was granted for; any other request, and any other thread's, is left alone.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from urllib.parse import urlsplit

import requests
from mlflow.tracking.request_auth.abstract_request_auth_provider import RequestAuthProvider

PROVIDER_NAME = "branchkey-registry"
Origin = tuple[str, str, int | None]
_GRANT: ContextVar[tuple[Origin, str] | None] = ContextVar("branchkey_registry_grant", default=None)


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def authorization(username: str | None = None, password: str | None = None, token: str | None = None) -> str | None:
    """The `Authorization` header for the credentials (a bearer token, else basic auth); None without any."""
    if token:
        return f"Bearer {token}"
    if username and password:
        return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    return None


@contextmanager
def granted(tracking_uri: str, header: str) -> Iterator[None]:
    """For the duration, in this context, requests to `tracking_uri`'s origin carry `header`."""
    token = _GRANT.set((_origin(tracking_uri), header))
    try:
        yield
    finally:
        _GRANT.reset(token)


class RegistryAuth(requests.auth.AuthBase):
    """Adds the granted header to a request for the granted origin; leaves any other request alone."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        grant = _GRANT.get()
        if grant is not None and grant[0] == _origin(request.url or ""):
            request.headers["Authorization"] = grant[1]
        return request

    def __repr__(self) -> str:
        return "RegistryAuth()"


class RegistryAuthProvider(RequestAuthProvider):
    """The provider MLflow finds through the entry point."""

    def get_name(self) -> str:
        return PROVIDER_NAME

    def get_auth(self) -> RegistryAuth:
        return RegistryAuth()
