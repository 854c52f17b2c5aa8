"""What a training site implements: the participant API, and how flows load one by name.

Modelled on the Xaynet SDK's `ParticipantABC`: `train` takes the current global model
(None in the first round: initialise) and returns the update; `evaluate` and
`participate` are optional. Flows name the participant as `"package.module:Class"` plus
JSON options, so a deployment can configure it without code. A flow run builds one
participant and keeps it for all its rounds; what must outlive the flow run (the global
model, the round counter) lives in the leaf's work dir.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bk_blocks.errors import BranchKeyError


class ParticipantError(BranchKeyError, ValueError):
    """A participant cannot be loaded, or returned something unusable."""


@dataclass
class TrainResult:
    """A round's local update: its aggregation weight, parameters in order, and metrics."""

    weighting: float
    parameters: list[np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)


class Participant(ABC):
    """A leaf's model: train on the global model, optionally evaluate it, optionally sit a round out."""

    @abstractmethod
    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        """Train from `global_model` (None: initialise a fresh model) and return the update."""

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        """Metrics of the new global model on local test data (none by default)."""
        return {}

    def participate(self, round_number: int) -> bool:
        """Whether to take part in this round (a device on battery may decline)."""
        return True

    def statistics(self) -> dict[str, np.ndarray]:
        """Raw columns (name to 1-D values) for a federated-statistics round; they are reduced to
        count, sums, min, max and NaN count on the site, so no raw value leaves it (none by default)."""
        return {}


def parse_options(options: dict[str, Any] | str | None) -> dict[str, Any]:
    """Participant options from a dict or a JSON object text (empty for None or blank)."""
    if isinstance(options, str):
        try:
            options = json.loads(options) if options.strip() else {}
        except json.JSONDecodeError as exc:
            raise ParticipantError(f"participant options are not valid JSON: {exc.msg}") from None
    if options is not None and not isinstance(options, dict):
        raise ParticipantError("participant options must be a JSON object")
    return dict(options or {})


def load_participant(path: str, options: dict[str, Any] | str | None = None) -> Participant:
    """Instantiate `"package.module:Class"` with keyword `options` (a dict or a JSON object text)."""
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise ParticipantError(f"participant must be 'package.module:Class', got {path!r}")
    keywords = parse_options(options)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ParticipantError(f"cannot import participant {path!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Participant)):
        raise ParticipantError(f"{path!r} is not a Participant subclass")
    return cls(**keywords)


def check_result(result: Any) -> TrainResult:
    """Refuse a train() result that would make a bad update, naming the problem."""
    if not isinstance(result, TrainResult):
        raise ParticipantError(f"train() must return a TrainResult, got {type(result).__name__}")
    if not np.isfinite(result.weighting) or result.weighting <= 0:
        raise ParticipantError(f"train() returned weighting {result.weighting!r}; it must be finite and > 0")
    if not result.parameters:
        raise ParticipantError("train() returned no parameters")
    return result
