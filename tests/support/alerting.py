"""Participants for the alert tests: digits failing its evaluation (a round that fails after its
upload, with its event), and one declaring no metrics."""

from __future__ import annotations

import numpy as np

from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.participant import Participant, TrainResult


class Undeclared(Participant):
    """A participant that declares no metrics."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        return TrainResult(1.0, [np.zeros(1, np.float32)])


class DigitsFailingEvaluation(DigitsSoftmax):
    """Trains and uploads as digits does, then raises evaluating the aggregate: the round fails
    after the platform aggregated it, so the next (healthy) run resumes it."""

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        raise RuntimeError("evaluation data unreadable")
