"""One HTTP client for the tests' calls to the servers they started: `httpx.request` builds a new
client, and its TLS context (about 20 ms of CPU), per call, which polling loops paid several
times a second on a machine the tests keep busy."""

from __future__ import annotations

import httpx

LOCAL = httpx.Client(timeout=30)
