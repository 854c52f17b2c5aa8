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

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefect_branchkey.bk_blocks.archive import all_finite, read_aggregate, read_aggregate_into
from prefect_branchkey.bk_blocks.errors import BranchKeyError
from prefect_branchkey.flows.participant import Participant, ParticipantError
from prefect_branchkey.flows.updates.deltas import GlobalModel, delta_norm
from prefect_branchkey.flows.updates.privacy import PrivacySettings, privatize

Precision = Literal["native", "float32", "float16"]
# How many of the leaf's latest update norms the guard's median looks at, and how many it needs.
RECENT_NORMS = 5
MIN_NORMS_FOR_GUARD = 3


class UpdateRefusedError(BranchKeyError):
    """The update guard refused the round's update: nothing is uploaded."""


class UpdateSettings(BaseModel):
    """What a deployment lets leave the site (a flow parameter, one group in the UI): the upload
    precision and the update guard. A misspelt field is refused, naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Update")

    upload_precision: Precision = Field(
        "native", description="native (as trained), float32, or float16 (half the bytes); the same on every leaf.")
    max_update_norm_ratio: Annotated[float, Field(gt=1, allow_inf_nan=False)] | None = Field(
        None, description="Refuse an update further from the global model than this times the leaf's recent "
                          "median; None: no norm guard (NaN or infinity is always refused).")


class UpdatePolicy(UpdateSettings):
    """The update settings with the privacy settings: everything `prepare_update` applies."""

    model_config = ConfigDict(title="Update policy")

    privacy: PrivacySettings = Field(default_factory=PrivacySettings)


def settings_error(error: ValidationError) -> str:
    """A settings model's refusal in one line, naming each field: `max_update_norm_ratio: Input
    should be greater than 1`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or e.get('input')}: {e['msg']}" for e in error.errors())


def update_policy(update: UpdateSettings | None = None, privacy: PrivacySettings | None = None) -> UpdatePolicy:
    """The policy a round applies, from the flows' `update` and `privacy` parameters."""
    return UpdatePolicy(**(update or UpdateSettings()).model_dump(), privacy=privacy or PrivacySettings())


@dataclass(frozen=True)
class PreparedUpdate:
    """The parameters to upload, and what the record of the round says about them."""

    parameters: list[np.ndarray]
    update_norm: float | None
    precision: str


def prepare_update(parameters: Sequence[np.ndarray], global_model: GlobalModel | None,
                   policy: UpdatePolicy, recent_norms: Sequence[float],
                   rng: np.random.Generator | None = None, trained_dtypes: Sequence[str] = ()) -> PreparedUpdate:
    """Check, guard, privatize and cast a round's update (in the module docstring's order);
    `rng` draws the DP noise (default: seeded from the OS); `trained_dtypes` are the dtypes the
    run's earlier rounds trained in (a layer that changed dtype is refused)."""
    check_against_model(parameters, global_model)
    check_dtypes(parameters, trained_dtypes)
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


def check_against_model(parameters: Sequence[np.ndarray], global_model: GlobalModel | None) -> None:
    """Refuse parameters whose layers differ in number, shape or kind from the global model's."""
    if global_model is None:
        return
    if len(parameters) != len(global_model):
        raise ParticipantError(f"train() returned {len(parameters)} layers; the global model has {len(global_model)}")
    for index, mine in enumerate(parameters):
        theirs = global_model[index]
        if tuple(mine.shape) != tuple(theirs.shape) or mine.dtype.kind != theirs.dtype.kind:
            raise ParticipantError(f"train() returned layer {index} as {mine.dtype} {mine.shape}; the global model "
                                   f"has {theirs.dtype} {tuple(theirs.shape)}")


def check_dtypes(parameters: Sequence[np.ndarray], trained_dtypes: Sequence[str]) -> None:
    """Refuse a layer whose dtype changed since the run's earlier rounds (none known: nothing to
    compare): every leaf of a branch uploads the same dtypes, and the platform would refuse it."""
    if len(trained_dtypes) != len(parameters):
        return
    for index, (layer, dtype) in enumerate(zip(parameters, trained_dtypes, strict=True)):
        if layer.dtype != np.dtype(dtype):
            raise ParticipantError(f"train() returned layer {index} as {layer.dtype}; this run's earlier rounds "
                                   f"trained it as {np.dtype(dtype)}: a layer keeps its dtype for the whole run")


def check_finite(parameters: Sequence[np.ndarray], cast_to: str | None = None) -> None:
    """Refuse an update holding NaN or infinity, naming the first layer that does (after a cast
    to `cast_to`: values beyond its range, which the cast turned into infinity)."""
    for index, layer in enumerate(parameters):
        if layer.dtype.kind == "f" and not all_finite(layer):
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


def load_global_model(participant: Participant, path: Path, dtypes: Sequence[str]) -> list[np.ndarray]:
    """The global model at `path` as the participant takes it: loaded in place into its live
    arrays when it offers them (`Participant.parameters`), else read into new arrays in the
    model's own dtypes."""
    live = participant.parameters()
    if live is None:
        return read_back(read_aggregate(path), dtypes)
    read_aggregate_into(path, live)
    return live


def read_back(layers: list[np.ndarray], dtypes: Sequence[str]) -> list[np.ndarray]:
    """An aggregate's layers in the model's own dtypes (recorded when it last trained), so a
    float16 upload precision never changes the dtype the participant trains in."""
    if len(dtypes) != len(layers):
        return layers
    return [layer if layer.dtype == np.dtype(dtype) else layer.astype(dtype)
            for layer, dtype in zip(layers, dtypes, strict=True)]
