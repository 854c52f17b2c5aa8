"""Client-side differential privacy for a leaf's updates, with the site's budget accounted.

Each round with DP on, the update's difference to the global model (the delta) is clipped to
L2 norm `clip_norm` and Gaussian noise of standard deviation `noise_multiplier * clip_norm` is
added to every coordinate; the leaf uploads global model + noised delta. Changing the site's
records can move the clipped delta anywhere within the ball of radius `clip_norm`, so one round
is a Gaussian mechanism of sensitivity 2 * `clip_norm` (noise `noise_multiplier / 2` times the
sensitivity); the rounds compose, and `dp-accounting`'s RDP accountant turns them into the site's epsilon for
`delta`. The ledger of noised rounds lives in the work dir (`privacy.json`), so epsilon is
cumulative across flow runs and across the leaf's deployments. A round is counted when its
noised update is written, before it is sent: a crash can only over-count, never under-count.

This is local DP on updates: it bounds what anyone who sees the uploads (the platform
included) can learn about the site's records. It is not secure aggregation, and it says
nothing about what the site's own metrics reveal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prefect_branchkey.bk_blocks.errors import BranchKeyError, MissingExtraError
from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.flows.updates.deltas import GlobalModel, apply_delta, delta_norm, layer_chunks

LEDGER = "privacy.json"
# Two clipped deltas (with and without a change to the site's records) differ by up to 2 clip norms.
SENSITIVITY_IN_CLIP_NORMS = 2.0


class PrivacyPolicyError(BranchKeyError, ValueError):
    """A differential-privacy setting is unusable, or the budget is spent (refused at flow start)."""


PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class PrivacySettings(BaseModel):
    """A deployment's client-side differential privacy (a flow parameter, one group in the UI);
    `clip_norm` None turns DP off. A misspelt field is refused, naming it: it would turn DP off."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Differential privacy")

    clip_norm: PositiveNumber | None = Field(
        None, description="L2 norm each update's delta is clipped to; None: no differential privacy.")
    noise_multiplier: PositiveNumber = Field(
        1.0, description="Gaussian noise, in clip norms, added to every coordinate of the clipped delta.")
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta at which the site's epsilon is accounted.")
    epsilon_budget: PositiveNumber | None = Field(
        None, description="No round may take the site's epsilon past this; None: no budget.")

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None


def _rdp_accountant() -> Any:
    """Google's RDP accountant and the Gaussian event it composes (the `privacy` extra)."""
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as exc:
        raise MissingExtraError("Differential privacy", "privacy", exc) from None
    return rdp.RdpAccountant(), dp_accounting.GaussianDpEvent


def privatize(parameters: Sequence[np.ndarray], global_model: GlobalModel | None, clip_norm: float,
              noise_multiplier: float, rng: np.random.Generator, norm: float | None = None) -> list[np.ndarray]:
    """Global model + the clipped, noised delta, in each layer's dtype; non-float layers pass
    unchanged. Without a global model (a run's first round) the delta is taken from a zero
    model. `norm` is the delta's norm when the caller has it. Chunk by chunk: one new copy of
    the model, no float64 copy of a layer."""
    floats = [i for i, layer in enumerate(parameters) if layer.dtype.kind == "f"]
    if norm is None:
        norm = delta_norm(parameters, global_model)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    result = list(parameters)
    for i in floats:
        bases = layer_chunks(global_model, i) if global_model is not None else None
        result[i] = apply_delta(parameters[i], bases, scale, noise_multiplier * clip_norm, rng)
    return result


class PrivacyLedger:
    """The noised rounds a leaf has released, by noise multiplier, kept in its work dir."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / LEDGER

    def rounds(self) -> dict[float, int]:
        """Noised rounds released so far, by noise multiplier."""
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        return {float(z): int(n) for z, n in data["rounds_by_noise_multiplier"].items()}

    def epsilon(self, delta: float, extra_round_at: float | None = None) -> float:
        """The site's epsilon at `delta` for every round released (plus one more at `extra_round_at`)."""
        rounds = self.rounds()
        if extra_round_at is not None:
            rounds[extra_round_at] = rounds.get(extra_round_at, 0) + 1
        if not rounds:
            return 0.0
        accountant, gaussian = _rdp_accountant()
        for noise_multiplier, count in rounds.items():
            accountant.compose(gaussian(noise_multiplier / SENSITIVITY_IN_CLIP_NORMS), count=count)
        return float(accountant.get_epsilon(delta))

    def record(self, noise_multiplier: float) -> None:
        """Count one more noised round, atomically."""
        rounds = self.rounds()
        rounds[noise_multiplier] = rounds.get(noise_multiplier, 0) + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path, "w") as handle:
            json.dump({"rounds_by_noise_multiplier": {repr(z): n for z, n in rounds.items()}}, handle)


def privacy_facts(ledger: PrivacyLedger, privacy: PrivacySettings) -> dict[str, float | str | None]:
    """A history row's DP columns: the leaf's epsilon so far and the settings."""
    return {"dp_epsilon": ledger.epsilon(privacy.delta), "dp_delta": privacy.delta, "clip_norm": privacy.clip_norm,
            "noise_multiplier": privacy.noise_multiplier}


def account_noised_update(work_dir: Path, privacy: PrivacySettings) -> dict[str, float | str | None]:
    """With DP on, count the noised update just written in the leaf's ledger and return the
    round's DP columns (epsilon after it); nothing with DP off. Called before the round's state
    is saved: a crash in between retrains and over-counts, never under-counts."""
    if not privacy.enabled:
        return {}
    ledger = PrivacyLedger(work_dir)
    ledger.record(privacy.noise_multiplier)
    return privacy_facts(ledger, privacy)


def epsilon_past_budget(policy: PrivacySettings, ledger: PrivacyLedger) -> float | None:
    """The epsilon one more noised round would take the leaf to, when that passes the budget;
    None when it does not (or there is no budget, or DP is off)."""
    if not policy.enabled or policy.epsilon_budget is None:
        return None
    after = ledger.epsilon(policy.delta, policy.noise_multiplier)
    return after if after > policy.epsilon_budget else None


def check_budget_at_start(policy: PrivacySettings, work_dir: Path, round_in_progress: bool = False) -> None:
    """Refuse to start a flow whose next round would already exceed the budget. A round in
    progress (its noised update already counted) may always finish: it releases nothing new. With
    DP on, the accountant must be installed before any round starts."""
    if policy.enabled:
        _rdp_accountant()
    ledger = PrivacyLedger(work_dir)
    next_epsilon = None if round_in_progress else epsilon_past_budget(policy, ledger)
    if next_epsilon is not None:
        spent = ledger.epsilon(policy.delta)
        raise PrivacyPolicyError(f"privacy.epsilon_budget {policy.epsilon_budget:g} is spent: this leaf is at epsilon "
                                 f"{spent:.3g} (delta {policy.delta:g}) and one more round would make it "
                                 f"{next_epsilon:.3g}; raise the budget or the noise, or stop training here")
