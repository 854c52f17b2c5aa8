"""An example participant on real data: softmax regression in numpy on scikit-learn's digits.

The 1,797 bundled 8x8 digit images are split across leaves non-IID: each leaf holds
mostly the class "assigned" to it (its index modulo 10), so no leaf can learn all ten
digits alone and the federation's global model beats every local one. Each leaf's test
data is split the same way, so `evaluate` tells how the global model does on the data
that site actually sees. Needs the `examples` extra (scikit-learn).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from prefect_branchkey.bk_blocks.errors import MissingExtraError
from prefect_branchkey.flows.participant import Participant, TrainResult

CLASSES = 10
FEATURES = 64


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def non_iid_split(labels: np.ndarray, leaves: int, skew: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices per leaf: a sample goes to a leaf of its class with probability `skew`, else anywhere.
    A class's leaves are those whose index is the class modulo 10 (with more than ten leaves, each
    class has several, drawn among evenly), so every leaf has a home class."""
    home = labels % leaves
    if leaves > CLASSES:
        home = (labels + CLASSES * rng.integers(0, -(-leaves // CLASSES), size=labels.size)) % leaves
    random_leaf = rng.integers(0, leaves, size=labels.size)
    owner = np.where(rng.random(labels.size) < skew, home, random_leaf)
    return [np.flatnonzero(owner == leaf) for leaf in range(leaves)]


class DigitsSoftmax(Participant):
    """One leaf's share of the digits data and a softmax-regression model trained with SGD."""

    metrics: ClassVar[dict[str, str]] = {"accuracy": "max", "loss": "min"}

    def __init__(self, leaf_index: int = 0, leaves: int = 3, epochs: int = 1, learning_rate: float = 0.1,
                 batch_size: int = 32, skew: float = 0.8, seed: int = 7) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise MissingExtraError("The digits example", "examples", exc) from None

        if not 0 <= leaf_index < leaves:
            raise ValueError(f"leaf_index must be in [0, {leaves}), got {leaf_index}")
        digits = load_digits()
        features = (digits.data / 16.0).astype(np.float32)
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(seed)
        order = rng.permutation(labels.size)
        test_size = labels.size // 5
        test, train = order[:test_size], order[test_size:]
        mine = train[non_iid_split(labels[train], leaves, skew, rng)[leaf_index]]
        mine_test = test[non_iid_split(labels[test], leaves, skew, rng)[leaf_index]]
        self.x_train, self.y_train = features[mine], labels[mine]
        self.x_test, self.y_test = features[mine_test], labels[mine_test]
        self.epochs, self.learning_rate, self.batch_size = epochs, learning_rate, batch_size
        self._rng = np.random.default_rng(seed + 1000 * (leaf_index + 1))

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        weights, bias = self._start_from(global_model)
        for _ in range(self.epochs):
            order = self._rng.permutation(self.y_train.size)
            for start in range(0, order.size, self.batch_size):
                batch = order[start : start + self.batch_size]
                self._sgd_step(weights, bias, self.x_train[batch], self.y_train[batch])
        loss, accuracy = self._score(weights, bias, self.x_train, self.y_train)
        return TrainResult(float(self.y_train.size), [weights, bias], {"loss": loss, "accuracy": accuracy})

    def statistics(self) -> dict[str, np.ndarray]:
        """Each pixel of this leaf's training images as a raw column (`pixel_00` .. `pixel_63`), for
        the federation's per-feature mean and std (normalisation constants) before training."""
        return {f"pixel_{index:02d}": self.x_train[:, index] for index in range(FEATURES)}

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        """Loss and accuracy on this leaf's test share; none when the share is empty (a leaf of a
        large federation may draw no test sample)."""
        if not self.y_test.size:
            return {}
        loss, accuracy = self._score(global_model[0], global_model[1], self.x_test, self.y_test)
        return {"loss": loss, "accuracy": accuracy}

    def participate(self, round_number: int) -> bool:
        """Only a leaf with training data takes part."""
        return self.y_train.size > 0

    def _start_from(self, global_model: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        if global_model is None:
            return np.zeros((FEATURES, CLASSES), np.float32), np.zeros(CLASSES, np.float32)
        return global_model[0].astype(np.float32, copy=True), global_model[1].astype(np.float32, copy=True)

    def _sgd_step(self, weights: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        probabilities = _softmax(x @ weights + bias)
        probabilities[np.arange(y.size), y] -= 1.0
        probabilities /= y.size
        weights -= self.learning_rate * (x.T @ probabilities)
        bias -= self.learning_rate * probabilities.sum(axis=0)

    @staticmethod
    def _score(weights: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        probabilities = _softmax(x @ weights + bias)
        loss = float(-np.log(probabilities[np.arange(y.size), y] + 1e-12).mean())
        return loss, float((probabilities.argmax(axis=1) == y).mean())
