"""Client-side differential privacy: clipping, noise scale, and the site's accounted budget."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from prefect_branchkey.flows.updates.privacy import (
    PrivacyLedger,
    PrivacyPolicyError,
    PrivacySettings,
    check_budget_at_start,
    privatize,
)

GLOBAL = [np.zeros(1000, np.float32), np.zeros((10, 10), np.float32)]


def delta_norm(result: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((r.astype(np.float64) - g) ** 2) for r, g in zip(result, GLOBAL, strict=False))))


def test_a_large_update_is_clipped_to_the_bound() -> None:
    update = [np.full(1000, 3.0, np.float32), np.full((10, 10), -3.0, np.float32)]
    result = privatize(update, GLOBAL, clip_norm=1.0, noise_multiplier=1e-9, rng=np.random.default_rng(0))
    assert delta_norm(result) == pytest.approx(1.0, rel=1e-4)


def test_a_small_update_is_not_scaled_up() -> None:
    update = [np.full(1000, 0.001, np.float32), np.zeros((10, 10), np.float32)]
    result = privatize(update, GLOBAL, clip_norm=1.0, noise_multiplier=1e-9, rng=np.random.default_rng(0))
    assert delta_norm(result) == pytest.approx(np.sqrt(1000) * 0.001, rel=1e-3)


def test_noise_has_the_configured_scale() -> None:
    big = [np.zeros(200_000, np.float32)]
    result = privatize(big, [np.zeros(200_000, np.float32)], clip_norm=2.0, noise_multiplier=0.5,
                       rng=np.random.default_rng(1))
    assert float(np.std(result[0])) == pytest.approx(1.0, rel=0.01)
    assert abs(float(np.mean(result[0]))) < 0.01


def test_noise_is_added_to_the_global_model_not_to_the_raw_update() -> None:
    global_model = [np.full(50_000, 10.0, np.float32)]
    result = privatize([np.full(50_000, 10.0, np.float32)], global_model, clip_norm=1.0, noise_multiplier=0.1,
                       rng=np.random.default_rng(2))
    assert float(np.mean(result[0])) == pytest.approx(10.0, abs=0.01)


def test_fortran_ordered_layers_are_privatized_in_place_of_garbage() -> None:
    layer = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    result = privatize([layer], [np.zeros((3, 4), np.float32)], clip_norm=1e3, noise_multiplier=1e-9,
                       rng=np.random.default_rng(0))
    np.testing.assert_allclose(result[0], layer, atol=1e-3)


def test_one_round_is_accounted_at_sensitivity_twice_the_clip_norm(tmp_path: Path) -> None:
    """A change of the site's records can move the clipped delta across the whole ball: 2 C."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(0.5))
    assert PrivacyLedger(tmp_path).epsilon(1e-5, 1.0) == pytest.approx(accountant.get_epsilon(1e-5))


def test_non_float_layers_pass_unchanged() -> None:
    counts = np.arange(5, dtype=np.int64)
    result = privatize([np.zeros(3, np.float32), counts], [np.zeros(3, np.float32), counts], 1.0, 1.0,
                       np.random.default_rng(0))
    assert result[1] is counts


def test_epsilon_grows_with_every_round_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    epsilons = []
    for _ in range(4):
        ledger.record(1.0)
        epsilons.append(ledger.epsilon(1e-5))
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 4


def test_epsilon_survives_a_restart(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path).record(1.0)
    PrivacyLedger(tmp_path).record(2.0)
    before = PrivacyLedger(tmp_path).epsilon(1e-5)
    assert before > 0 and PrivacyLedger(tmp_path).rounds() == {1.0: 1, 2.0: 1}


def test_more_noise_costs_less_epsilon(tmp_path: Path) -> None:
    assert PrivacyLedger(tmp_path).epsilon(1e-5, 2.0) < PrivacyLedger(tmp_path).epsilon(1e-5, 1.0)


def test_a_spent_budget_is_refused_at_start(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for _ in range(3):
        ledger.record(1.0)
    with pytest.raises(PrivacyPolicyError, match=re.escape("privacy.epsilon_budget 10 is spent")):
        check_budget_at_start(PrivacySettings(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10), tmp_path)


def test_a_round_in_progress_may_finish_on_a_spent_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for _ in range(3):
        ledger.record(1.0)
    check_budget_at_start(PrivacySettings(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10), tmp_path,
                          round_in_progress=True)


def test_a_budget_with_room_for_a_round_starts(tmp_path: Path) -> None:
    check_budget_at_start(PrivacySettings(clip_norm=1.0, noise_multiplier=2.0, epsilon_budget=10), tmp_path)


@pytest.mark.parametrize(("settings", "named"), [
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"clip_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
    ({"clip_norm": 1.0, "delta": 1.0}, "delta"),
    ({"clip_norm": 1.0, "epsilon_budget": 0.0}, "epsilon_budget"),
])
def test_bad_dp_settings_are_refused_naming_the_parameter(settings: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        PrivacySettings(**settings)
