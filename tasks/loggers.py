"""The logger for code that runs inside a flow or task run, and outside one in scripts and tests."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter:
    """The current run's logger (its lines reach the UI); outside a run, the logger `fallback`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)
