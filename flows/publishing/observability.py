"""What a leaf and a federation show in Prefect: history tables, summaries with charts,
flow run names and tags, round events.

Artifact keys are stable per leaf (and per federation, by the branch's name), so the UI keeps
one artifact with a version per round. Flow runs are named by leaf and round and tagged
`leaf:<name>`, `branch:<branch name>` and `branch-id:<id>`, for the UI's filters (the name is
the id when the platform gives none). Events `branchkey.round.completed` /
`branchkey.round.failed` name the leaf and its branch as resources and carry the metrics, for
Automations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from statistics import fmean
from typing import Any
from uuid import UUID

import httpx
from prefect import get_client
from prefect.artifacts import MarkdownArtifact, TableArtifact, create_markdown_artifact, create_table_artifact
from prefect.client.schemas.actions import ArtifactCreate
from prefect.events import Event, emit_event
from prefect.exceptions import PrefectException
from prefect.runtime import flow_run

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.leaf.history import RoundRecord
from prefect_branchkey.flows.publishing.charts import line_chart_svg, markdown_image

SPARK = "▁▂▃▄▅▆▇█"
TABLE_COLUMNS = ("run_number", "round", "status", "aggregation_id", "weighting", "train_s", "wait_s", "round_s",
                 "bytes_up", "bytes_down", "update_norm", "upload_precision", "dp_epsilon", "dp_delta", "clip_norm",
                 "noise_multiplier", "best_round", "metric_drop", "served")


def artifact_key(kind: str, name: str) -> str:
    """A stable artifact key (lowercase letters, digits, dashes) for a leaf or a federation."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "leaf"
    return f"branchkey-{kind}-{slug}"


def leaf_tags(leaf_name: str, branch_id: str, branch_name: str | None = None) -> list[str]:
    """The tags of a leaf's runs and events: by leaf, by branch name and by branch id, so the
    UI's filters find them by what a person knows."""
    return ["branchkey", f"leaf:{leaf_name}", f"branch:{branch_name or branch_id}", f"branch-id:{branch_id}"]


def run_tags(credentials: BranchKeyCredentials, branch_name: str | None = None) -> list[str]:
    """The tags of a leaf's flow runs."""
    return leaf_tags(credentials.leaf_name, credentials.branch_id, branch_name)


def label_flow_run(name: str, tags: Sequence[str]) -> None:
    """Rename the current flow run and add tags (a deployment's runs start with generated names).

    Nothing is sent when the run already has both (a run created with them). Only the
    UI's labels depend on it, so an API failure (after the client's own retries) is
    logged, never raised: a round must not fail over its name.
    """
    run_id = flow_run.get_id()
    if run_id is None or (flow_run.get_name() == name and set(tags) <= set(flow_run.get_tags())):
        return
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(UUID(run_id))
            client.update_flow_run(UUID(run_id), name=name, tags=sorted(set(current.tags) | set(tags)))
    except (httpx.HTTPError, PrefectException) as exc:
        logging.getLogger(__name__).warning("could not name flow run %s %r: %s", run_id, name, exc)


def primary_metric(names: Sequence[str]) -> str | None:
    """The metric charts follow: accuracy if the participant reports it, else the first by name."""
    return "accuracy" if "accuracy" in names else (sorted(names)[0] if names else None)


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


def branch_label(rows: Sequence[dict[str, Any]]) -> str:
    """`branch <name>` of the latest row that knows it ('' for none), for titles."""
    names = [r.get("branch_name") or r.get("branch_id") for r in rows if r.get("branch_name") or r.get("branch_id")]
    return f"branch {names[-1]}" if names else ""


def summary_markdown(leaf_name: str, rows: Sequence[dict[str, Any]]) -> str:
    """The leaf's latest metrics and their trend, its best and served global model, as markdown."""
    completed = [r for r in rows if r["status"] == "completed"]
    branch = branch_label(rows)
    title = f"# {leaf_name}" + (f" ({branch})" if branch else "")
    if not completed:
        return f"{title}\n\nNo completed round yet."
    latest = completed[-1]
    lines = [title, "",
             f"Round {latest['round']} of run {latest['run_number']}, aggregation `{latest['aggregation_id']}`.", "",
             *_best_lines(latest),
             "| metric | latest | previous | trend |", "|---|---|---|---|"]
    names = sorted(set(latest["eval_metrics"]) | set(latest["train_metrics"]))
    for source in ("eval", "train"):
        for name in names:
            series = [r[f"{source}_metrics"][name] for r in completed if name in r[f"{source}_metrics"]]
            if not series:
                continue
            previous = f"{series[-2]:.4f}" if len(series) > 1 else "-"
            lines.append(f"| {source} {name} | {series[-1]:.4f} | {previous} | {sparkline(series)} |")
    lines += _privacy_lines(rows)
    lines += _audit_lines(rows)
    lines += _evaluation_lines(rows)
    for name in sorted(latest["eval_metrics"]):
        points = [(r["round"], r["eval_metrics"][name]) for r in completed
                  if name in r["eval_metrics"] and r["run_number"] == latest["run_number"]]
        chart = line_chart_svg(f"{leaf_name}: global model {name} per round", {name: points})
        lines += ["", markdown_image(f"{name} per round", chart)]
    return "\n".join(lines)


def _best_lines(latest: dict[str, Any]) -> list[str]:
    """Which global model is the best by the primary metric, and whether the latest one is served."""
    if latest.get("best_round") is None:
        return []
    metric = latest["primary_metric"]
    best = (f"**Best global model:** round {latest['best_round']} of run {latest['best_run_number']} "
            f"({metric} {latest['best_value']:.4f}).")
    if latest.get("served"):
        served = f"**Served:** round {latest['round']}, the latest."
    else:
        worse = (f"is {latest['metric_drop']:.4f} {metric} worse" if latest.get("metric_drop") is not None
                 else f"reported no {metric}")
        served = (f"**Served:** the best (round {latest['best_round']}); round {latest['round']}'s model {worse} "
                  "and was not promoted.")
    return [best, "", served, ""]


def _evaluation_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The latest drift check (an `evaluated` row) against the value its model had after its round."""
    checks = [r for r in rows if r["status"] == "evaluated"]
    if not checks:
        return []
    check = checks[-1]
    metric = check.get("primary_metric") or ""
    value = check["eval_metrics"].get(metric)
    at_round = [r["eval_metrics"].get(metric) for r in rows if r["status"] == "completed"
                and (r["run_number"], r["round"]) == (check["run_number"], check["round"])]
    then = f", {at_round[-1]:.4f} when its round ended" if at_round and at_round[-1] is not None else ""
    now = f"{metric} {value:.4f}" if value is not None else "no " + metric
    when = check["finished_at"].strftime("%Y-%m-%d %H:%M UTC") if check.get("finished_at") else "-"
    return ["", f"**Drift check** ({when}, evaluation only): the served model of round {check['round']} scores "
                f"{now} on today's data{then}."]


def _privacy_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """With DP on: the leaf's cumulative epsilon, its settings, and whether its budget is spent."""
    noised = [r for r in rows if r.get("dp_epsilon") is not None]
    if not noised:
        return []
    last = noised[-1]
    spent = (" The privacy budget is spent: the leaf declines further rounds." if last["status"] == "budget-spent"
             else "")
    return ["", f"Differential privacy: epsilon {last['dp_epsilon']:.3g} at delta {last['dp_delta']:g} so far "
                f"(clip norm {last['clip_norm']:g}, noise multiplier {last['noise_multiplier']:g}).{spent}"]


def _audit_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the latest flow run sent, as its audit trail records it: payloads, bytes, epsilon spent,
    and the trail's head hash to check the leaf's trail against (`bk audit verify --head`)."""
    audited = [r for r in rows if r.get("audit_head")]
    if not audited:
        return []
    latest = audited[-1]
    this_run = [r for r in audited if r.get("flow_run_id") == latest.get("flow_run_id")]
    payloads = sum(r.get("payloads_sent") or 0 for r in this_run)
    sent = sum(r.get("bytes_up") or 0 for r in this_run)
    epsilon = [r["dp_epsilon"] for r in this_run if r.get("dp_epsilon") is not None]
    earlier = [r["dp_epsilon"] for r in rows if r.get("dp_epsilon") is not None and r not in this_run]
    spent = (f"; epsilon spent {epsilon[-1] - (earlier[-1] if earlier else 0.0):.3g} ({epsilon[-1]:.3g} so far)"
             if epsilon else "; no differential privacy")
    return ["", f"**Sent by this run:** {payloads} payload(s), {sent:,} bytes uploaded{spent}. Audit trail head "
                f"`{latest['audit_head']}`: `bk audit verify WORK_DIR --head {latest['audit_head']}` on the leaf's "
                "machine proves its trail still holds every entry up to this one."]


def publish_artifacts(leaf_name: str, rows: Sequence[dict[str, Any]], flow_run_id: str | None = None) -> None:
    """Update the leaf's history table and summary artifacts (a new version of each), attached to
    `flow_run_id` (default: the current flow run)."""
    with get_client(sync_client=True) as client:
        for artifact in (
            TableArtifact(table=history_table(rows), key=artifact_key("history", leaf_name),
                          description=f"BranchKey round history of {leaf_name}, {branch_label(rows)}"),
            MarkdownArtifact(markdown=summary_markdown(leaf_name, rows), key=artifact_key("summary", leaf_name),
                             description=f"Latest federated round of {leaf_name}, {branch_label(rows)}"),
        ):
            client.create_artifact(ArtifactCreate(
                type=artifact.type, key=artifact.key, description=artifact.description,
                flow_run_id=flow_run_id or flow_run.get_id(),
                data=artifact.format(_sync=True)))  # type: ignore[call-arg]  # sync_compatible's _sync is untyped


def federation_table(histories: Mapping[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per round with every leaf's evaluation metrics side by side, and their means.

    Columns: round, how many leaves reported and which did not, then per metric (the primary one
    first) each leaf's value and the mean, then the run and the aggregation's id.
    """
    entries: dict[tuple[int, int], dict[str, Any]] = {}
    for leaf in sorted(histories):
        for row in histories[leaf]:
            if row["status"] == "completed":
                key = (row["run_number"], row["round"])
                entry = entries.setdefault(key, {"aggregation_id": row["aggregation_id"], "values": {}})
                entry["values"][leaf] = row["eval_metrics"]
    names = sorted({name for entry in entries.values() for metrics in entry["values"].values() for name in metrics})
    primary = primary_metric(names)
    ordered = ([primary] if primary else []) + [name for name in names if name != primary]
    table = []
    for (run_number, round_number), entry in sorted(entries.items()):
        missing = [leaf for leaf in sorted(histories) if leaf not in entry["values"]]
        row = {"round": round_number, "leaves": len(entry["values"]), "missing": ", ".join(missing) or "-"}
        for name in ordered:
            values = {leaf: metrics[name] for leaf, metrics in entry["values"].items() if name in metrics}
            row.update({f"{leaf} {name}": round(value, 4) for leaf, value in values.items()})
            if values:
                row[f"mean {name}"] = round(fmean(values.values()), 4)
        row.update({"run_number": run_number, "aggregation_id": entry["aggregation_id"]})
        table.append(row)
    return table


def federation_summary(title: str, histories: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """The federation's latest round per leaf (a leaf that did not report it is shown missing, with
    its last report), each leaf's best and served model, and a chart of the primary metric."""
    table = federation_table(histories)
    if not table:
        return f"# {title}\n\nNo completed round yet."
    latest = table[-1]
    run, round_number = latest["run_number"], latest["round"]
    names = sorted({name for rows in histories.values() for r in rows for name in r["eval_metrics"]})
    metric = primary_metric(names)
    lines = [f"# {title}", "", f"Round {round_number} of run {run}: {latest['leaves']} of {len(histories)} "
             f"leaves reported, aggregation `{latest['aggregation_id']}`.", ""]
    if metric is None:
        return "\n".join(lines)
    lines += [f"| leaf | {metric} (round {round_number}) | first round | trend | best | served |",
              "|---|---|---|---|---|---|"]
    series: dict[str, list[tuple[int, float]]] = {}
    for leaf in sorted(histories):
        completed = [r for r in histories[leaf] if r["status"] == "completed"]
        points = [(r["round"], r["eval_metrics"][metric]) for r in completed
                  if r["run_number"] == run and metric in r["eval_metrics"]]
        if points:
            series[leaf] = points
        lines.append(f"| {leaf} | {_latest_cell(completed, points, run, round_number)} | "
                     f"{f'{points[0][1]:.4f}' if points else '-'} | {sparkline([v for _, v in points])} | "
                     f"{_best_and_served(completed[-1]) if completed else '- | -'} |")
    if series:
        chart = line_chart_svg(f"global model {metric} per round, by leaf", series)
        lines += ["", markdown_image(f"{metric} per round by leaf", chart)]
    return "\n".join(lines)


def _latest_cell(completed: Sequence[dict[str, Any]], points: Sequence[tuple[int, float]], run: int,
                 round_number: int) -> str:
    """The leaf's value for the federation's latest round, or `missing` with its last report: never
    an older value passed off as the current one."""
    if points and points[-1][0] == round_number and completed[-1]["run_number"] == run:
        return f"{points[-1][1]:.4f}"
    if not completed:
        return "missing (no round reported)"
    last = completed[-1]
    return f"missing (last reported round {last['round']} of run {last['run_number']})"


def _best_and_served(row: dict[str, Any]) -> str:
    """The best global model so far and the one the site serves, as two table cells."""
    if row.get("best_value") is None:
        return "- | -"
    best = f"{row['best_value']:.4f} (round {row.get('best_round')})"
    served = f"round {row['round']}" if row.get("served") else f"round {row.get('best_round')} (the best)"
    return f"{best} | {served}"


def publish_federation_artifacts(name: str, histories: Mapping[str, Sequence[dict[str, Any]]]) -> None:
    """Update the federation's side-by-side history table and its summary (a new version of each)."""
    create_table_artifact(table=federation_table(histories), key=artifact_key("federation", name),
                          description=f"BranchKey federation {name}: every leaf's evaluation per round")
    create_markdown_artifact(markdown=federation_summary(f"Federation {name}", histories),
                             key=artifact_key("federation-summary", name),
                             description=f"BranchKey federation {name}: latest round and trend")


def round_event(record: RoundRecord, *, failed: bool = False, error: str | None = None,
                event_id: UUID | None = None) -> Event:
    """`branchkey.round.<status>` (`completed`, `resynced`) or `.failed`, about the leaf, related to
    its branch, the flow run that recorded it and its tags; `event_id` given, Prefect keeps one
    event of that id."""
    payload: dict[str, Any] = {
        "run_number": record.run_number, "round": record.round, "status": record.status,
        "aggregation_id": record.aggregation_id, "file_id": record.file_id,
        "train_metrics": record.train_metrics, "eval_metrics": record.eval_metrics,
        "round_s": record.round_s, "bytes_up": record.bytes_up, "update_norm": record.update_norm,
        "upload_precision": record.upload_precision, "dp_epsilon": record.dp_epsilon, "dp_delta": record.dp_delta,
        "clip_norm": record.clip_norm, "noise_multiplier": record.noise_multiplier,
        "branch_name": record.branch_name, "primary_metric": record.primary_metric,
        "best_run_number": record.best_run_number, "best_round": record.best_round, "best_value": record.best_value,
        "served": record.served,
    }
    if error is not None:
        payload["error"] = error
    related = [{"prefect.resource.id": f"branchkey.branch.{record.branch_id}", "prefect.resource.role": "branch"}]
    if record.flow_run_id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{record.flow_run_id}",
                        "prefect.resource.role": "flow-run"})
    related += [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
                for tag in leaf_tags(record.leaf_name, record.branch_id, record.branch_name)]
    return Event(
        event="branchkey.round.failed" if failed else f"branchkey.round.{record.status}",
        resource={"prefect.resource.id": f"branchkey.leaf.{record.leaf_id}",
                  "prefect.resource.name": record.leaf_name, "branchkey.branch-id": record.branch_id},
        related=related, payload=payload, occurred=record.finished_at or datetime.now(UTC),
        **({"id": event_id} if event_id is not None else {}),
    )


def metric_dropped_event(record: RoundRecord, event_id: UUID | None = None) -> Event:
    """`branchkey.metric.dropped`: the leaf's new global model fell more than its alert allows
    below the best one; about the leaf, labelled with the metric, for the metric-drop automation."""
    value = record.eval_metrics.get(record.primary_metric or "")
    return Event(
        event="branchkey.metric.dropped",
        resource={"prefect.resource.id": f"branchkey.leaf.{record.leaf_id}",
                  "prefect.resource.name": record.leaf_name, "branchkey.branch-id": record.branch_id,
                  "branchkey.metric": record.primary_metric or ""},
        related=[{"prefect.resource.id": f"branchkey.branch.{record.branch_id}", "prefect.resource.role": "branch"}],
        payload={"metric": record.primary_metric, "value": value, "best_value": record.best_value,
                 "best_round": record.best_round, "drop": record.metric_drop, "alert_above": record.metric_drop_alert,
                 "run_number": record.run_number, "round": record.round},
        occurred=record.finished_at or datetime.now(UTC),
        **({"id": event_id} if event_id is not None else {}),
    )


def emit_round_event(record: RoundRecord, *, failed: bool = False, error: str | None = None) -> None:
    """Send the round's event through Prefect's background events worker (a failed round: it must
    not wait on the API)."""
    event = round_event(record, failed=failed, error=error)
    emit_event(event=event.event, resource=dict(event.resource), related=[dict(r) for r in event.related],
               payload=event.payload, occurred=event.occurred, id=event.id)
