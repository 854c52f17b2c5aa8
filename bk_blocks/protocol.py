"""Names fixed by the BranchKey v1 protocol, shared by the client and bk_server."""

from __future__ import annotations

from typing import Literal

AGGREGATION_STATUS = "aggregation_status"
RUN_STATUS = "run_status"
RUN_STATUSES = ("start", "pause", "stop")
METRIC_MODES = ("test", "train", "non-federated")
MetricsMode = Literal["test", "train", "non-federated"]
