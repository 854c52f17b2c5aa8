"""The leaf's summary artifact says where its privacy budget stands when DP is on."""

from __future__ import annotations

from typing import Any

from prefect_branchkey.flows.publishing.observability import summary_markdown


def row(status: str = "completed", **privacy: Any) -> dict[str, Any]:
    return {"status": status, "round": 1, "run_number": 1, "aggregation_id": "a", "eval_metrics": {"accuracy": 0.5},
            "train_metrics": {}, **privacy}


DP = {"dp_epsilon": 4.73, "dp_delta": 1e-5, "clip_norm": 1.0, "noise_multiplier": 1.0}


def test_summary_shows_the_leafs_epsilon_and_settings_with_dp_on() -> None:
    summary = summary_markdown("leaf", [row(**DP)])
    assert "epsilon 4.73 at delta 1e-05 so far (clip norm 1, noise multiplier 1)" in summary


def test_summary_says_when_the_budget_is_spent() -> None:
    text = summary_markdown("leaf", [row(**DP), row("budget-spent", **DP)])
    assert "privacy budget is spent" in text


def test_summary_says_nothing_of_privacy_without_dp() -> None:
    assert "epsilon" not in summary_markdown("leaf", [row()])
