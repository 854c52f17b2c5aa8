"""A participant whose training takes a set time: a round that is busy when its worker is stopped.

`train` writes `started_file` (when given) as it starts, so a test knows the round is inside
its training, then sleeps `train_s` seconds and returns the global model plus one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from prefect_branchkey.flows.participant import Participant, TrainResult


class SlowModel(Participant):
    """Two small float32 layers; training sleeps `train_s` seconds."""

    metrics: ClassVar[dict[str, str]] = {"mean": "max"}

    def __init__(self, train_s: float = 0.0, started_file: str | None = None) -> None:
        self.train_s, self.started_file = train_s, started_file

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        if self.started_file:
            Path(self.started_file).write_text(f"{round_number}\n")
        time.sleep(self.train_s)
        base = global_model or [np.zeros(8, np.float32), np.zeros(2, np.float32)]
        return TrainResult(10.0, [(layer + 1).astype(np.float32) for layer in base], {"round": float(round_number)})

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        return {"mean": float(np.mean(global_model[0]))}
