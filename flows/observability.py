"""What a leaf shows in Prefect: history table and summary artifacts, progress, round events.

Artifact keys are stable per leaf, so the UI keeps one artifact per leaf with a version
per round. Events `branchkey.round.completed` / `branchkey.round.failed` name the leaf
and its branch as resources and carry the metrics, for Automations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from .history import RoundRecord

SPARK = "▁▂▃▄▅▆▇█"
TABLE_COLUMNS = ("run_number", "round", "status", "aggregation_id", "weighting", "train_s", "wait_s", "round_s",
                 "bytes_up", "bytes_down")


def artifact_key(kind: str, leaf_name: str) -> str:
    """A stable artifact key (lowercase letters, digits, dashes) for a leaf."""
    slug = re.sub(r"[^a-z0-9]+", "-", leaf_name.lower()).strip("-") or "leaf"
    return f"branchkey-{kind}-{slug}"


def sparkline(values: Sequence[float]) -> str:
    """Unicode blocks, one per value, scaled between the series' min and max."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def history_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """History rows flattened for a table artifact: metrics as `eval_<name>` / `train_<name>` columns."""
    table = []
    for row in rows:
        flat = {column: _cell(row.get(column)) for column in TABLE_COLUMNS}
        flat.update({f"eval_{k}": round(v, 4) for k, v in sorted(row["eval_metrics"].items())})
        flat.update({f"train_{k}": round(v, 4) for k, v in sorted(row["train_metrics"].items())})
        table.append(flat)
    return table


def _cell(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def summary_markdown(leaf_name: str, rows: Sequence[dict[str, Any]]) -> str:
    """The leaf's latest metrics and their trend, as markdown."""
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        return f"# {leaf_name}\n\nNo completed round yet."
    latest = completed[-1]
    lines = [f"# {leaf_name}", "",
             f"Round {latest['round']} of run {latest['run_number']}, aggregation `{latest['aggregation_id']}`.", "",
             "| metric | latest | previous | trend |", "|---|---|---|---|"]
    names = sorted(set(latest["eval_metrics"]) | set(latest["train_metrics"]))
    for source in ("eval", "train"):
        for name in names:
            series = [r[f"{source}_metrics"][name] for r in completed if name in r[f"{source}_metrics"]]
            if not series:
                continue
            previous = f"{series[-2]:.4f}" if len(series) > 1 else "-"
            lines.append(f"| {source} {name} | {series[-1]:.4f} | {previous} | {sparkline(series)} |")
    return "\n".join(lines)


def publish_artifacts(leaf_name: str, rows: Sequence[dict[str, Any]]) -> None:
    """Update the leaf's history table and summary artifacts (a new version of each)."""
    create_table_artifact(table=history_table(rows), key=artifact_key("history", leaf_name),
                          description=f"BranchKey round history of {leaf_name}")
    create_markdown_artifact(markdown=summary_markdown(leaf_name, rows), key=artifact_key("summary", leaf_name),
                             description=f"Latest federated round of {leaf_name}")


def emit_round_event(record: RoundRecord, *, failed: bool = False, error: str | None = None) -> None:
    """`branchkey.round.completed` or `.failed`, about the leaf, related to its branch."""
    payload: dict[str, Any] = {
        "run_number": record.run_number, "round": record.round, "status": record.status,
        "aggregation_id": record.aggregation_id, "file_id": record.file_id,
        "train_metrics": record.train_metrics, "eval_metrics": record.eval_metrics,
        "round_s": record.round_s,
    }
    if error is not None:
        payload["error"] = error
    emit_event(
        event="branchkey.round.failed" if failed else "branchkey.round.completed",
        resource={"prefect.resource.id": f"branchkey.leaf.{record.leaf_id}",
                  "prefect.resource.name": record.leaf_name, "branchkey.branch-id": record.branch_id},
        related=[{"prefect.resource.id": f"branchkey.branch.{record.branch_id}", "prefect.resource.role": "branch"}],
        payload=payload,
    )
