"""Participants for the alert tests: a tiny model that declares its metrics, and one whose
evaluation of the global model raises (a round that fails after its upload, with its event)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from flows.participant import Participant, TrainResult


class Tiny(Participant):
    """One float32 layer nudged each round; declares accuracy (higher is better) and loss (lower)."""

    metrics: ClassVar[dict[str, str]] = {"accuracy": "max", "loss": "min"}

    def __init__(self, **options: Any) -> None:
        self.options = options

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        base = global_model or [np.zeros(8, np.float32)]
        return TrainResult(10.0, [(base[0] + 0.1).astype(np.float32)], {"loss": 1.0 / round_number})

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        return {"accuracy": float(min(1.0, global_model[0].mean())), "loss": 1.0 / round_number}


class FailsEvaluation(Tiny):
    """Trains and uploads like Tiny, then raises evaluating the aggregate: the round fails."""

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        raise RuntimeError("evaluation data unreadable")


class Undeclared(Participant):
    """A participant that declares no metrics."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        return TrainResult(1.0, [np.zeros(1, np.float32)])
