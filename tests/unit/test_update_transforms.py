"""The update transforms between train() and the upload: check, guard, cast, and read back."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from prefect_branchkey.flows.participant import ParticipantError
from prefect_branchkey.flows.updates.privacy import PrivacySettings
from prefect_branchkey.flows.updates.transforms import (
    UpdatePolicy,
    UpdateRefusedError,
    UpdateSettings,
    delta_norm,
    prepare_update,
    read_back,
    settings_error,
    update_policy,
)

GLOBAL = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]


def update(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, np.float32), np.full(4, value, np.float32)]


def test_delta_norm_is_the_l2_distance_over_all_layers() -> None:
    assert delta_norm(update(1.0), GLOBAL) == pytest.approx(np.sqrt(10.0))


def test_native_precision_uploads_the_parameters_unchanged() -> None:
    prepared = prepare_update(update(0.5), GLOBAL, UpdatePolicy(), [])
    assert [layer.dtype for layer in prepared.parameters] == [np.float32, np.float32]
    assert prepared.precision == "native" and prepared.update_norm == pytest.approx(0.5 * np.sqrt(10))


def test_float16_precision_casts_float_layers_only() -> None:
    parameters = [np.full(3, 0.1, np.float64), np.arange(3, dtype=np.int64)]
    global_model = [np.zeros(3, np.float64), np.zeros(3, np.int64)]
    prepared = prepare_update(parameters, global_model, UpdatePolicy(upload_precision="float16"), [])
    assert [layer.dtype for layer in prepared.parameters] == [np.float16, np.int64]


def test_aggregate_is_read_back_in_the_models_dtypes() -> None:
    layers = read_back([np.ones(2, np.float16), np.ones(2, np.int32)], ["float64", "int32"])
    assert [layer.dtype for layer in layers] == [np.float64, np.int32]


def test_update_with_nan_is_refused_naming_the_layer() -> None:
    parameters = update(1.0)
    parameters[1][2] = np.nan
    with pytest.raises(UpdateRefusedError, match="layer 1 holds NaN"):
        prepare_update(parameters, GLOBAL, UpdatePolicy(), [])


def test_update_beyond_float16s_range_is_refused_after_the_cast() -> None:
    with pytest.raises(UpdateRefusedError, match="layer 0 holds values beyond float16's range"):
        prepare_update(update(1e6), GLOBAL, UpdatePolicy(upload_precision="float16"), [])


def test_update_far_beyond_the_recent_median_is_refused() -> None:
    with pytest.raises(UpdateRefusedError, match="median of this leaf's last 3 updates"):
        prepare_update(update(100.0), GLOBAL, UpdatePolicy(max_update_norm_ratio=10), [1.0, 1.2, 0.9])


def test_update_within_the_ratio_passes_the_guard() -> None:
    prepared = prepare_update(update(1.0), GLOBAL, UpdatePolicy(max_update_norm_ratio=10), [1.0, 1.2, 0.9])
    assert prepared.update_norm == pytest.approx(np.sqrt(10))


def test_norm_guard_waits_for_enough_history() -> None:
    prepared = prepare_update(update(100.0), GLOBAL, UpdatePolicy(max_update_norm_ratio=10), [1.0, 1.0])
    assert prepared.update_norm is not None


def test_update_of_the_wrong_shape_is_refused_before_any_transform() -> None:
    with pytest.raises(ParticipantError, match="layer 0 as float32 \\(3,\\)"):
        prepare_update([np.zeros(3, np.float32), np.zeros(4, np.float32)], GLOBAL, UpdatePolicy(), [])


def test_update_with_a_layer_missing_is_refused() -> None:
    with pytest.raises(ParticipantError, match="returned 1 layers; the global model has 2"):
        prepare_update([np.zeros((2, 3), np.float32)], GLOBAL, UpdatePolicy(), [])


@pytest.mark.parametrize(("settings", "named"), [
    ({"upload_precision": "bfloat8"}, "upload_precision"),
    ({"max_update_norm_ratio": 0.5}, "max_update_norm_ratio"),
    ({"max_update_norm_ratio": float("nan")}, "max_update_norm_ratio"),
])
def test_bad_settings_are_refused_naming_the_parameter(settings: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        UpdateSettings(**settings)


def test_misspelt_update_setting_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError) as refused:
        UpdateSettings.model_validate({"upload_precison": "float16"})
    assert settings_error(refused.value) == "upload_precison: Extra inputs are not permitted"


def test_misspelt_privacy_setting_is_refused_rather_than_running_without_dp() -> None:
    with pytest.raises(ValidationError, match="clipnorm"):
        PrivacySettings.model_validate({"clipnorm": 1.0})


def test_update_policy_joins_the_update_and_privacy_settings() -> None:
    policy = update_policy(UpdateSettings(upload_precision="float16"), PrivacySettings(clip_norm=2.0, delta=1e-6))
    assert (policy.upload_precision, policy.privacy.clip_norm, policy.privacy.delta) == ("float16", 2.0, 1e-6)


def test_a_layer_whose_dtype_changed_mid_run_is_refused_naming_it() -> None:
    parameters = [np.zeros((2, 3), np.float32), np.zeros(4, np.float64)]
    with pytest.raises(ParticipantError, match="layer 1 as float64; this run's earlier rounds trained it as float32"):
        prepare_update(parameters, GLOBAL, UpdatePolicy(), [], trained_dtypes=["<f4", "<f4"])


def test_the_first_round_of_a_run_has_no_dtypes_to_keep() -> None:
    prepared = prepare_update([np.zeros((2, 3), np.float64), np.zeros(4, np.float64)], None, UpdatePolicy(), [])
    assert [layer.dtype for layer in prepared.parameters] == [np.float64, np.float64]
