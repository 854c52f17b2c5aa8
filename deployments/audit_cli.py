"""`bk audit`: a leaf's audit trail for its reviewers: `verify` (the chain, optionally against a head
hash kept elsewhere), `export` (CSV or Parquet, one row per entry) and `acknowledge` (seal a
reviewed break so the leaf may send again). The trail itself is `prefect_branchkey.flows.leaf.audit`."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Literal

# pyarrow ships no type information (no stubs, no py.typed).
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow: no stubs
import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow: no stubs
from cyclopts import App

from prefect_branchkey.flows.leaf.audit import (
    AuditTrailError,
    Verification,
    acknowledge_break,
    head_covers,
    holds,
    read_entries,
    trail_path,
    verify_trail,
)
from prefect_branchkey.flows.leaf.state import state_path

app = App(name="audit", help="A leaf's audit trail: what left the site and what arrived.")
# The columns of an export: the entry's own fields, the facts a reviewer filters on, then all facts as JSON.
COLUMNS = ("seq", "at", "kind", "step", "key", "destination", "run_number", "round", "bytes", "sha256", "file_id",
           "aggregation_id", "facts", "prev", "hash")


@app.command
def verify(work_dir: Path, /, *, head: str | None = None) -> None:
    """Check WORK_DIR's audit trail: every entry chained to the one before, none edited, removed or
    reordered, the last one complete. Exits 1 naming the first entry that is not, 2 when there is
    no trail. Entries cut from the end leave an intact chain: give `--head` to find them.

    Parameters
    ----------
    work_dir
        The leaf's work directory (the flows' `work_dir`).
    head
        A head hash kept elsewhere (a run's summary artifact in Prefect, a history row): the trail
        must still hold that entry, so entries cut from its end are found too.
    """
    path = trail_path(work_dir)
    if not path.is_file():
        print(f"bk audit verify: no audit trail at {path} (is {work_dir} the leaf's work dir?)", file=sys.stderr)
        raise SystemExit(2)
    result = verify_trail(work_dir)
    for acknowledged in result.acknowledged:
        print(f"acknowledged break at {acknowledged}")
    if result.problem is not None:
        print(f"bk audit verify: {path} is broken at {result.problem}", file=sys.stderr)
        raise SystemExit(1)
    recorded = _state_head(work_dir)
    if recorded is not None and not holds(result, recorded):
        print(f"bk audit verify: {path} does not hold entry {recorded}, the last one the leaf recorded in its "
              "state: it was cut short or replaced", file=sys.stderr)
        raise SystemExit(1)
    if head is not None and not head_covers(result, head):
        where = ("only inside an acknowledged break" if head in result.sealed_hashes
                 else "no longer: entries were cut from its end, or it was rewritten")
        print(f"bk audit verify: {path} holds entry {head} {where}", file=sys.stderr)
        raise SystemExit(1)
    print(_summary(path, result, head))


def _state_head(work_dir: Path) -> str | None:
    """The audit head the leaf's state last recorded (None without a state or a head)."""
    try:
        head = json.loads(state_path(work_dir).read_text()).get("audit_head")
    except (OSError, ValueError, AttributeError):
        return None
    return str(head) if head else None


def _summary(path: Path, result: Verification, head: str | None) -> str:
    """One line for an intact trail: its length, head, and the payloads never confirmed."""
    lines = [f"{path}: {result.entries} entries, chain intact, head {result.head or '-'}"
             + (f" (holds {head})" if head else "")]
    if result.unconfirmed:
        lines.append(f"{len(result.unconfirmed)} payload(s) recorded as sending and never confirmed or refused "
                     "(the process stopped before the platform answered): " + ", ".join(result.unconfirmed))
    return "\n".join(lines)


@app.command
def export(work_dir: Path, /, *, format: Literal["csv", "parquet"] = "csv", output: Path | None = None) -> None:
    """Write WORK_DIR's audit trail for a reviewer, one row per entry (a broken trail is exported too,
    and said on stderr).

    Parameters
    ----------
    work_dir
        The leaf's work directory.
    format
        csv or parquet.
    output
        The file to write (default: audit-trail.csv or audit-trail.parquet here).
    """
    rows = [_row(entry) for entry in read_entries(work_dir)]
    target = output or Path(f"audit-trail.{format}")
    if format == "csv":
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), target)
    result = verify_trail(work_dir)
    if result.problem is not None:
        print(f"bk audit export: the trail is broken at {result.problem}", file=sys.stderr)
    print(f"{len(rows)} entries written to {target}")


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    facts = entry["facts"]
    row = {name: entry[name] for name in ("seq", "at", "kind", "step", "key", "prev", "hash")}
    row |= {name: facts.get(name) for name in ("destination", "run_number", "round", "bytes", "sha256", "file_id",
                                               "aggregation_id")}
    row["facts"] = json.dumps(facts, sort_keys=True)
    return {name: row[name] for name in COLUMNS}


def _schema() -> pa.Schema:
    numbers = {"seq", "run_number", "round", "bytes"}
    return pa.schema([(name, pa.int64() if name in numbers else pa.string()) for name in COLUMNS])


@app.command
def acknowledge(work_dir: Path, /, *, reason: str) -> None:
    """After reviewing a broken trail, seal it so the leaf may send again: an entry naming the break
    and REASON is appended, chained to every byte before it (`bk audit verify` then reports the
    break as acknowledged; any later change to those bytes breaks the trail again).

    Parameters
    ----------
    work_dir
        The leaf's work directory.
    reason
        Who reviewed the break and what they found; kept in the trail.
    """
    try:
        entry = acknowledge_break(work_dir, reason, _state_head(work_dir))
    except AuditTrailError as exc:
        print(f"bk audit acknowledge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"acknowledged {entry['facts']['break']} as entry {entry['seq']}; the leaf may send again")
