"""When a platform task is retried: only on failures a retry can fix.

Every task in this package retries with exponential backoff and jitter, and only when
the failure is a `TransientError` (5xx, timeouts, dropped connections, a notification
not there yet). Authentication errors and rejected archives fail at once, with the
platform's message. So does a full disk (`DiskFullError`): it does not free itself within a
backoff's seconds, and each retry of a large write or download would fill it again; the round
fails naming the file and the bytes, and its next run resumes at the saved step once space is freed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from prefect.tasks import exponential_backoff

from prefect_branchkey.bk_blocks import TransientError

RETRIES = 5
RETRY_BACKOFF_FACTOR_S = 2


def retry_only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: True only if the task failed with a `TransientError`."""
    try:
        state.result()
    except TransientError:
        return True
    except BaseException:
        return False
    return False


RETRY_OPTIONS: Mapping[str, Any] = MappingProxyType({
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=RETRY_BACKOFF_FACTOR_S),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_only_transient,
})
