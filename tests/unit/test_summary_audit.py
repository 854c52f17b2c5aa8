"""The leaf's summary artifact states what its latest flow run sent, as the audit trail records it."""

from __future__ import annotations

from typing import Any

from prefect_branchkey.flows.publishing.observability import summary_markdown


def row(round_number: int, flow_run_id: str, head: str | None, **facts: Any) -> dict[str, Any]:
    return {"status": "completed", "round": round_number, "run_number": 1, "aggregation_id": f"a{round_number}",
            "eval_metrics": {"accuracy": 0.5}, "train_metrics": {}, "flow_run_id": flow_run_id,
            "audit_head": head, "payloads_sent": 3, "bytes_up": 1000, **facts}


def test_summary_states_the_runs_payloads_bytes_epsilon_and_the_trails_head() -> None:
    dp = {"dp_delta": 1e-5, "clip_norm": 1.0, "noise_multiplier": 1.0}
    rows = [row(1, "earlier-run", "h1", dp_epsilon=1.0, **dp), row(2, "this-run", "h2", dp_epsilon=1.5, **dp),
            row(3, "this-run", "h3", dp_epsilon=1.75, **dp)]
    summary = summary_markdown("leaf", rows)
    assert "**Sent by this run:** 6 payload(s), 2,000 bytes uploaded; epsilon spent 0.75 (1.75 so far)." in summary
    assert "Audit trail head `h3`" in summary and "bk audit verify WORK_DIR --head h3" in summary


def test_summary_says_no_differential_privacy_when_no_round_was_noised() -> None:
    summary = summary_markdown("leaf", [row(1, "run", "h1")])
    assert "3 payload(s), 1,000 bytes uploaded; no differential privacy" in summary


def test_summary_of_a_history_without_an_audit_trail_says_nothing_of_it() -> None:
    assert "Audit trail" not in summary_markdown("leaf", [row(1, "run", None)])
