"""The fault suite's participant: two float32 layers (`size` parameters and a small second
one, so a crash between layers leaves a partial aggregate) that move the global model by
fresh random noise each round, so no two trainings give the same bytes (the case where a
stale update is not caught by its idempotency key)."""

from __future__ import annotations

import os

import numpy as np

from prefect_branchkey.flows.participant import Participant, TrainResult


class NoisyModel(Participant):
    """Global model plus noise; weighting fixed per leaf so FedAvg's weights are not all equal."""

    def __init__(self, size: int = 1000, weighting: float = 10.0) -> None:
        self.size, self.weighting = size, weighting
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        base = global_model or [np.zeros(self.size, np.float32), np.zeros(16, np.float32)]
        update = [(layer + self.rng.normal(0.0, 1.0, layer.shape)).astype(np.float32) for layer in base]
        return TrainResult(self.weighting, update, {"round": float(round_number)})

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        return {"mean": float(np.mean(global_model[0]))}
