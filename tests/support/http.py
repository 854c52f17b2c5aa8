"""One HTTP client for the tests' calls to the servers they started: `httpx.request` builds a new
client, and its TLS context (about 20 ms of CPU), per call, which polling loops paid several
times a second on a machine the tests keep busy."""

from __future__ import annotations

import httpx

# Idle connections are dropped after 2 s, before a server's own keep-alive timeout (uvicorn's is
# 5 s) could close one just as it is reused.
LOCAL = httpx.Client(timeout=30, limits=httpx.Limits(keepalive_expiry=2))
