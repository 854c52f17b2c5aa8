"""Names fixed by the BranchKey v1 protocol, shared by the client and bk_server."""

from __future__ import annotations

from typing import Literal

AGGREGATION_STATUS = "aggregation_status"
RUN_STATUS = "run_status"
RUN_STATUSES = ("start", "pause", "stop")
METRIC_MODES = ("test", "train", "non-federated")
MetricsMode = Literal["test", "train", "non-federated"]

# Error `code`s a platform may add to a refusal's body (bk_server does; the official platform
# sends only `error`, whose text is matched for a blocked run).
ERROR_CODE_RUN_BLOCKED = "run_blocked"
ERROR_CODE_STALE_ROUND = "stale_round"
RUN_BLOCKED_TEXT = "run is blocked"
