"""What happens to a participant's update between `train()` and the upload, always in this order:

1. check: the parameters match the global model layer for layer (shape and dtype);
2. guard: no NaN or infinity, and (when configured) the L2 norm of the delta to the global
   model no larger than `max_update_norm_ratio` times the leaf's recent median: a diverged
   local model must not poison the federation;
3. differential privacy (when `privacy.clip_norm` is set): the delta clipped and noised
   (`prefect_branchkey.flows.updates.privacy`);
4. cast the float layers to the upload precision: `native` (as `train()` returned them, the
   default), `float32`, or `float16` (half of float32's bytes). The aggregate is read back into
   the model's own dtypes (`read_back`). Every leaf of a branch must upload the same dtypes:
   the platform refuses an update whose layers differ from the round's.

Nothing leaves the site when a step refuses: the round fails naming the problem. The archive
written from the result is what the round uploads, also after a resume.
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefect_branchkey.bk_blocks.errors import BranchKeyError
from prefect_branchkey.flows.participant import ParticipantError
from prefect_branchkey.flows.updates.deltas import chunks, delta_norm
from prefect_branchkey.flows.updates.privacy import PrivacyPolicy, privatize

PRECISIONS = ("native", "float32", "float16")
# How many of the leaf's latest update norms the guard's median looks at, and how many it needs.
RECENT_NORMS = 5
MIN_NORMS_FOR_GUARD = 3


class UpdatePolicyError(BranchKeyError, ValueError):
    """An update transform's setting is unusable (refused when the flow starts)."""


class UpdateRefusedError(BranchKeyError):
    """The update guard refused the round's update: nothing is uploaded."""


@dataclass(frozen=True)
class UpdatePolicy:
    """A deployment's update settings (flow parameters, so `prefect.yaml` can set them)."""

    upload_precision: str = "native"
    max_update_norm_ratio: float | None = None
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    def __post_init__(self) -> None:
        if self.upload_precision not in PRECISIONS:
            raise UpdatePolicyError(f"upload_precision must be one of {', '.join(PRECISIONS)}, "
                                    f"got {self.upload_precision!r}")
        ratio = self.max_update_norm_ratio
        if ratio is not None and not (math.isfinite(ratio) and ratio > 1):
            raise UpdatePolicyError(f"max_update_norm_ratio must be a number above 1 (or None: no norm guard), "
                                    f"got {ratio!r}")


def update_policy(upload_precision: str = "native", max_update_norm_ratio: float | None = None,
                  dp_clip_norm: float | None = None, dp_noise_multiplier: float = 1.0, dp_delta: float = 1e-5,
                  dp_epsilon_budget: float | None = None) -> UpdatePolicy:
    """The update policy from the flows' parameters, by the names `prefect.yaml` gives them."""
    return UpdatePolicy(upload_precision, max_update_norm_ratio,
                        PrivacyPolicy(dp_clip_norm, dp_noise_multiplier, dp_delta, dp_epsilon_budget))


UPDATE_PARAMETERS = tuple(inspect.signature(update_policy).parameters)


def update_policy_from_options(options: Mapping[str, Any]) -> UpdatePolicy:
    """The update policy from a mapping of the flows' parameter names (the simulation's
    `update_options`); an unknown name is refused, as a misspelt `dp_clip_norm` would turn DP off."""
    unknown = sorted(set(options) - set(UPDATE_PARAMETERS))
    if unknown:
        raise UpdatePolicyError(f"unknown update option(s) {', '.join(map(repr, unknown))}; "
                                f"the options are {', '.join(UPDATE_PARAMETERS)}")
    return update_policy(**options)


@dataclass(frozen=True)
class PreparedUpdate:
    """The parameters to upload, and what the record of the round says about them."""

    parameters: list[np.ndarray]
    update_norm: float | None
    precision: str


def prepare_update(parameters: Sequence[np.ndarray], global_model: Sequence[np.ndarray] | None,
                   policy: UpdatePolicy, recent_norms: Sequence[float],
                   rng: np.random.Generator | None = None) -> PreparedUpdate:
    """Check, guard, privatize and cast a round's update (in the module docstring's order);
    `rng` draws the DP noise (default: seeded from the OS)."""
    check_against_model(parameters, global_model)
    check_finite(parameters)
    norm = delta_norm(parameters, global_model) if global_model is not None else None
    if norm is not None and policy.max_update_norm_ratio is not None:
        check_norm(norm, recent_norms, policy.max_update_norm_ratio)
    dp = policy.privacy
    if dp.clip_norm is not None:
        parameters = privatize(parameters, global_model, dp.clip_norm, dp.noise_multiplier,
                               rng or np.random.default_rng(), norm)
    prepared = cast(parameters, policy.upload_precision)
    if policy.upload_precision != "native":
        check_finite(prepared, policy.upload_precision)
    return PreparedUpdate(prepared, norm, policy.upload_precision)


def check_against_model(parameters: Sequence[np.ndarray], global_model: Sequence[np.ndarray] | None) -> None:
    """Refuse parameters whose layers differ in number, shape or kind from the global model's."""
    if global_model is None:
        return
    if len(parameters) != len(global_model):
        raise ParticipantError(f"train() returned {len(parameters)} layers; the global model has {len(global_model)}")
    for index, (mine, theirs) in enumerate(zip(parameters, global_model)):
        if mine.shape != theirs.shape or mine.dtype.kind != theirs.dtype.kind:
            raise ParticipantError(f"train() returned layer {index} as {mine.dtype} {mine.shape}; the global model "
                                   f"has {theirs.dtype} {theirs.shape}")


def check_finite(parameters: Sequence[np.ndarray], cast_to: str | None = None) -> None:
    """Refuse an update holding NaN or infinity, naming the first layer that does (after a cast
    to `cast_to`: values beyond its range, which the cast turned into infinity)."""
    for index, layer in enumerate(parameters):
        if layer.dtype.kind == "f" and not all(np.isfinite(chunk).all() for chunk in chunks(layer)):
            why = f"values beyond {cast_to}'s range" if cast_to else "NaN or infinity (the local model diverged)"
            raise UpdateRefusedError(f"update refused: layer {index} holds {why}; nothing was uploaded")


def check_norm(norm: float, recent_norms: Sequence[float], ratio: float) -> None:
    """Refuse a delta norm above `ratio` times the median of the leaf's recent norms (once it
    has MIN_NORMS_FOR_GUARD of them: early rounds set the scale)."""
    recent = [n for n in recent_norms[-RECENT_NORMS:] if n is not None and math.isfinite(n)]
    if len(recent) < MIN_NORMS_FOR_GUARD:
        return
    median = statistics.median(recent)
    if median > 0 and norm > ratio * median:
        raise UpdateRefusedError(f"update refused: its distance to the global model ({norm:.4g}) is "
                                 f"{norm / median:.1f} times the median of this leaf's last {len(recent)} updates "
                                 f"({median:.4g}), above the allowed {ratio:g}; nothing was uploaded")


def cast(parameters: Sequence[np.ndarray], precision: str) -> list[np.ndarray]:
    """The float layers in the upload precision (other layers, and `native`, as they are).

    A value beyond the precision's range becomes infinity without a warning: `check_finite`
    refuses the cast update right after, with a message that names the cause."""
    if precision == "native":
        return list(parameters)
    dtype = np.dtype(precision)
    with np.errstate(over="ignore"):
        return [layer.astype(dtype, copy=False) if layer.dtype.kind == "f" else layer for layer in parameters]


def read_back(layers: list[np.ndarray], dtypes: Sequence[str]) -> list[np.ndarray]:
    """An aggregate's layers in the model's own dtypes (recorded when it last trained), so a
    float16 upload precision never changes the dtype the participant trains in."""
    if len(dtypes) != len(layers):
        return layers
    return [layer if layer.dtype == np.dtype(dtype) else layer.astype(dtype) for layer, dtype in zip(layers, dtypes)]
