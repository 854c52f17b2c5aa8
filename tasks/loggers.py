"""The logger for code that runs inside a flow or task run, and outside one in scripts and tests."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter:
    """The current run's logger (its lines reach the UI); outside a run, the logger `fallback`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)


class CurrentRunLogger(logging.LoggerAdapter):
    """A logger that writes each line to the run current when it is written, so one client
    serves every task of a flow run and its lines land under the task that made the call."""

    def __init__(self, fallback: str) -> None:
        super().__init__(logging.getLogger(fallback), {})

    def isEnabledFor(self, level: int) -> bool:
        return run_logger(self.logger.name).isEnabledFor(level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        run_logger(self.logger.name).log(level, msg, *args, **kwargs)
