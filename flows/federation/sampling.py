"""Client sampling for a simulated federation: which leaves take part in each round.

Large federations do not wait for every site every round: each round a fixed number of leaves
is drawn (a fraction of them, at least one), reproducibly from a seed and the round's number,
so a rerun with the same seed draws the same leaves. The platform closes a round once that many
updates are in (its `min_updates`); leaves not drawn sit the round out and catch up with the
latest global model when next drawn (the round flow's resync).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prefect_branchkey.bk_blocks.errors import BranchKeyError


class SamplingError(BranchKeyError, ValueError):
    """A sampling setting that cannot be used (refused before anything starts)."""


def leaves_per_round(leaves: int, fraction: float = 1.0, count: int | None = None) -> int:
    """How many of `leaves` take part in a round: `count` if given, else `fraction` of them
    rounded up; a fraction outside (0, 1] or a count outside [1, leaves] is refused."""
    if leaves < 1:
        raise SamplingError("a federation needs at least one leaf")
    if count is not None:
        if not 1 <= count <= leaves:
            raise SamplingError(f"leaves per round must be between 1 and the {leaves} leaves, got {count}")
        return count
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise SamplingError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, math.ceil(round(fraction * leaves, 9)))


@dataclass(frozen=True)
class SamplingPlan:
    """The leaves of a federation and how many of them each round draws, from `seed`."""

    leaves: tuple[str, ...]
    per_round: int
    seed: int = 0

    def chosen(self, round_number: int) -> list[str]:
        """The leaves drawn for `round_number` (in the federation's order): the same for the same
        seed and round, whatever was drawn before."""
        if self.per_round >= len(self.leaves):
            return list(self.leaves)
        rng = np.random.default_rng([self.seed, round_number])
        picked = rng.choice(len(self.leaves), size=self.per_round, replace=False)
        return [self.leaves[i] for i in sorted(picked)]

    def table(self, rounds: int) -> list[dict[str, object]]:
        """One row per round: which leaves were drawn, for the record."""
        return [{"round": n, "leaves": len(chosen), "chosen": ", ".join(chosen)}
                for n in range(1, rounds + 1) for chosen in [self.chosen(n)]]


def sampling_plan(leaves: Sequence[str], fraction: float = 1.0, count: int | None = None,
                  seed: int = 0) -> SamplingPlan:
    """The plan for these leaves (settings checked)."""
    return SamplingPlan(tuple(leaves), leaves_per_round(len(leaves), fraction, count), seed)
