"""What a training site implements: the participant API, and how flows load one by name.

Modelled on the Xaynet SDK's `ParticipantABC`: `train` takes the current global model
(None in the first round: initialise) and returns the update; `evaluate` and
`participate` are optional. A participant declares its evaluation metrics and which way is
better (`metrics = {"accuracy": "max", "loss": "min"}`): the leaf keeps its best global model
by the primary one, and alert set-up checks the metric it watches. Flows name the participant
as `"package.module:Class"` plus JSON options, so a deployment can configure it without code. A flow run builds one
participant and keeps it for all its rounds; what must outlive the flow run (the global
model, the round counter) lives in the leaf's work dir.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from prefect_branchkey.bk_blocks.errors import BranchKeyError


class ParticipantError(BranchKeyError, ValueError):
    """A participant cannot be loaded, or returned something unusable."""


@dataclass
class TrainResult:
    """A round's local update: its aggregation weight, parameters in order, and metrics."""

    weighting: float
    parameters: list[np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)


METRIC_DIRECTIONS = ("max", "min")


class Participant(ABC):
    """A leaf's model: train on the global model, optionally evaluate it, optionally sit a round out."""

    # The metrics `evaluate` reports, each with the direction that is better ("max" or "min").
    metrics: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        """Train from `global_model` (None: initialise a fresh model) and return the update."""

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        """Metrics of the new global model on local test data (none by default)."""
        return {}

    def participate(self, round_number: int) -> bool:
        """Whether to take part in this round (a device on battery may decline)."""
        return True

    def parameters(self) -> list[np.ndarray] | None:
        """The model's live, writable arrays in layer order (e.g. numpy views of a CPU torch
        model's state), or None, the default. When given, the leaf loads each global model into
        them in place, chunk by chunk, and hands these same arrays to `train` and `evaluate`: the
        model is held once in memory, whatever its size (otherwise the leaf reads the global model
        into new arrays beside the participant's own). `train` may return them as its update."""
        return None

    def statistics(self) -> dict[str, np.ndarray]:
        """Raw columns (name to 1-D values) for a federated-statistics round; they are reduced to
        count, sums, min, max and NaN count on the site, so no raw value leaves it (none by default)."""
        return {}

    def serve(self, model: Path, served: ServedModel) -> None:  # noqa: B027 -- an optional hook, empty by default
        """The model the site serves changed to `model` (a copy the leaf keeps); by default nothing
        is done, a participant that serves predictions reloads it here."""

    def export_model(self, model: Path, directory: Path) -> None:  # noqa: B027 -- an optional hook, empty by default
        """With an MLflow registry configured: write the promoted global model `model` (the `.npz`)
        into `directory` in the framework's own form (a torch `state_dict`, an MLflow flavour's
        directory), which the registry then holds; by default nothing is written and the `.npz` is
        registered as it is."""


@dataclass(frozen=True)
class ServedModel:
    """Which global model the site serves: its run, round and aggregation, and its value of the
    primary metric (None when the participant did not report it); `best` when it is the best so far."""

    run_number: int
    round: int
    aggregation_id: str
    metric: str | None
    value: float | None
    best: bool


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
    keywords = parse_options(options)
    return participant_class(path)(**keywords)


def import_object(path: str, what: str, form: str) -> Any:
    """The object `"package.module:name"` names, imported; ParticipantError naming `what` (and the
    expected `form`) when the path is malformed or nothing importable is there."""
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ParticipantError(f"{what} must be '{form}', got {path!r}")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ParticipantError(f"cannot import {what} {path!r}: {exc}") from None


def participant_class(path: str) -> type[Participant]:
    """The Participant subclass `"package.module:Class"` names (imported, not instantiated)."""
    cls = import_object(path, "participant", "package.module:Class")
    if not (isinstance(cls, type) and issubclass(cls, Participant)):
        raise ParticipantError(f"{path!r} is not a Participant subclass")
    for name, direction in cls.metrics.items():
        if direction not in METRIC_DIRECTIONS:
            raise ParticipantError(f"{path!r} declares metric {name!r} as {direction!r}; it must be 'max' or 'min'")
    return cls


def check_result(result: Any) -> TrainResult:
    """Refuse a train() result that would make a bad update, naming the problem."""
    if not isinstance(result, TrainResult):
        raise ParticipantError(f"train() must return a TrainResult, got {type(result).__name__}")
    if not np.isfinite(result.weighting) or result.weighting <= 0:
        raise ParticipantError(f"train() returned weighting {result.weighting!r}; it must be finite and > 0")
    if not result.parameters:
        raise ParticipantError("train() returned no parameters")
    return result
