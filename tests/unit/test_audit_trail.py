"""The audit trail's chain: what it records once, and how each kind of tampering is named."""

from __future__ import annotations

import errno
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.errors import DiskFullError
from prefect_branchkey.flows.leaf.audit import (
    AuditTrail,
    AuditTrailBrokenError,
    AuditTrailError,
    acknowledge_break,
    entry_hash,
    head_covers,
    holds,
    public_url,
    read_entries,
    trail_path,
    verify_trail,
)


def filled(work_dir: Path, uploads: int = 3) -> AuditTrail:
    """A trail of `uploads` confirmed uploads: 2 entries each, seq 1 to 2 * uploads."""
    trail = AuditTrail(work_dir)
    for index in range(uploads):
        trail.sending("upload", f"key-{index}", {"round": index + 1, "bytes": 100 + index, "sha256": "ab" * 32})
        trail.confirmed("upload", f"key-{index}", {"file_id": f"file-{index}"})
    return trail


def lines(work_dir: Path) -> list[bytes]:
    return trail_path(work_dir).read_bytes().splitlines(keepends=True)


def rewrite(work_dir: Path, new_lines: list[bytes]) -> None:
    trail_path(work_dir).write_bytes(b"".join(new_lines))


def test_each_entry_is_chained_to_the_one_before(tmp_path: Path) -> None:
    trail = filled(tmp_path)
    entries = list(read_entries(tmp_path))
    assert [entry["seq"] for entry in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["prev"] == "0" * 64
    assert all(later["prev"] == earlier["hash"] for earlier, later in itertools.pairwise(entries))
    assert all(entry_hash(entry) == entry["hash"] for entry in entries)
    result = verify_trail(tmp_path)
    assert result.intact and result.entries == 6 and result.head == entries[-1]["hash"] == trail.head


def test_a_payloads_step_is_recorded_once_however_often_it_is_retried(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    first = trail.sending("upload", "key", {"round": 1})
    assert trail.sending("upload", "key", {"round": 1}) == first
    assert [entry["step"] for entry in read_entries(tmp_path)] == ["sending"]


def test_a_process_killed_before_the_confirmation_leaves_an_intact_trail_the_rerun_completes(tmp_path: Path) -> None:
    AuditTrail(tmp_path).sending("upload", "key", {"round": 1})
    AuditTrail._known.clear()  # a new process: nothing cached
    killed = verify_trail(tmp_path)
    assert killed.intact and killed.unconfirmed == ["key"]
    rerun = AuditTrail(tmp_path)
    rerun.sending("upload", "key", {"round": 1})
    rerun.confirmed("upload", "key", {"file_id": "f"})
    assert [(e["kind"], e["step"]) for e in read_entries(tmp_path)] == [("upload", "sending"), ("upload", "confirmed")]
    assert verify_trail(tmp_path).unconfirmed == []


def test_a_refused_payload_is_recorded_with_the_platforms_reason(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    trail.sending("metrics", "key", {"metrics": {"accuracy": 0.9}})
    trail.refused("metrics", "key", ValueError("no such aggregation"))
    refused = list(read_entries(tmp_path))[-1]
    assert refused["step"] == "refused" and refused["facts"] == {"error": "ValueError: no such aggregation"}
    assert verify_trail(tmp_path).unconfirmed == []


def test_an_edited_value_names_the_edited_entry(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    content[2] = content[2].replace(b'"bytes":101', b'"bytes":999')
    rewrite(tmp_path, content)
    problem = verify_trail(tmp_path).problem
    assert problem is not None and (problem.line, problem.seq) == (3, 3) and "edited" in problem.problem


def test_an_edited_entry_whose_hash_was_recomputed_is_named_by_the_entry_after_it(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    entry = json.loads(content[2])
    entry["facts"]["bytes"] = 999
    entry["hash"] = entry_hash(entry)
    content[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    rewrite(tmp_path, content)
    problem = verify_trail(tmp_path).problem
    assert problem is not None and (problem.line, problem.seq) == (3, 3) and "recomputed" in problem.problem


def test_a_deleted_line_names_the_removed_entry(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    del content[3]
    rewrite(tmp_path, content)
    problem = verify_trail(tmp_path).problem
    assert problem is not None and problem.line == 4 and "entry 4 removed" in problem.problem


def test_swapped_lines_are_named_as_reordered(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    content[1], content[2] = content[2], content[1]
    rewrite(tmp_path, content)
    problem = verify_trail(tmp_path).problem
    assert problem is not None and (problem.line, problem.seq) == (2, 3) and "reordered" in problem.problem
    assert "entry 2" in problem.problem


def test_a_truncated_last_line_is_named(tmp_path: Path) -> None:
    filled(tmp_path)
    data = trail_path(tmp_path).read_bytes()
    trail_path(tmp_path).write_bytes(data[:-20])
    problem = verify_trail(tmp_path).problem
    assert problem is not None and problem.line == 6 and "truncated" in problem.problem


def test_a_trail_cut_at_its_end_no_longer_holds_the_anchored_head(tmp_path: Path) -> None:
    head = filled(tmp_path).head
    assert head is not None and head_covers(verify_trail(tmp_path), head)
    rewrite(tmp_path, lines(tmp_path)[:-1])
    cut = verify_trail(tmp_path)
    assert cut.intact and not head_covers(cut, head)


def test_nothing_is_appended_to_a_broken_trail(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    rewrite(tmp_path, content[:2] + content[3:])
    size = trail_path(tmp_path).stat().st_size
    with pytest.raises(AuditTrailBrokenError, match=r"entry 3 removed.*bk audit acknowledge"):
        AuditTrail(tmp_path).sending("upload", "next", {"round": 4})
    assert trail_path(tmp_path).stat().st_size == size


def test_an_acknowledged_break_lets_the_leaf_append_again(tmp_path: Path) -> None:
    filled(tmp_path)
    trail_path(tmp_path).write_bytes(trail_path(tmp_path).read_bytes()[:-20])
    entry = acknowledge_break(tmp_path, "reviewed by the site's DPO: power cut during the last write")
    assert entry["kind"] == "acknowledgement" and "truncated" in entry["facts"]["break"]
    AuditTrail(tmp_path).sending("upload", "next", {"round": 4})
    result = verify_trail(tmp_path)
    assert result.intact and len(result.acknowledged) == 1 and result.head == list(read_entries(tmp_path))[-1]["hash"]
    assert result.acknowledged[0].reason.startswith("reviewed by the site's DPO")


def test_a_change_between_a_break_and_its_acknowledgement_breaks_the_trail_again(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    rewrite(tmp_path, content[:2] + content[3:])
    acknowledge_break(tmp_path, "reviewed")
    assert verify_trail(tmp_path).intact
    content = lines(tmp_path)
    content[3] = content[3].replace(b'"bytes":102', b'"bytes":999')
    rewrite(tmp_path, content)
    result = verify_trail(tmp_path)
    assert result.problem is not None and result.problem.line == 3 and result.acknowledged == []


def test_a_line_that_is_not_its_entrys_canonical_json_is_a_break(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    content[1] = b'{"facts":{"file_id":"forged"},' + content[1][1:]  # a reader taking the first key sees this
    rewrite(tmp_path, content)
    problem = verify_trail(tmp_path).problem
    assert problem is not None and problem.line == 2 and "canonical" in problem.problem


def test_an_entry_whose_fields_have_the_wrong_types_is_named_not_a_crash(tmp_path: Path) -> None:
    filled(tmp_path)
    content = lines(tmp_path)
    entry = json.loads(content[2])
    entry["facts"] = ["not", "a", "mapping"]
    content[2] = json.dumps(entry).encode() + b"\n"
    rewrite(tmp_path, content)
    problem = verify_trail(tmp_path).problem
    assert problem is not None and problem.line == 3 and "not a complete audit entry" in problem.problem


def test_a_trail_without_the_leafs_last_recorded_entry_takes_nothing_until_acknowledged(tmp_path: Path) -> None:
    head = filled(tmp_path).head
    assert head is not None
    rewrite(tmp_path, lines(tmp_path)[:-2])
    with pytest.raises(AuditTrailBrokenError, match=f"does not hold entry {head}"):
        AuditTrail(tmp_path, expected_head=head).sending("upload", "next", {"round": 4})
    sealed = acknowledge_break(tmp_path, "reviewed: restored from last week's backup", expected_head=head)
    assert sealed["facts"]["missing_head"] == head
    AuditTrail(tmp_path, expected_head=head).sending("upload", "next", {"round": 4})
    assert verify_trail(tmp_path).intact


def test_a_write_the_full_disk_cuts_short_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = filled(tmp_path)
    before = trail_path(tmp_path).read_bytes()
    real_write = os.write

    def half_then_full(descriptor: int, data: bytes | memoryview) -> int:
        if len(data) > 10:
            return real_write(descriptor, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError):
        trail.sending("upload", "next", {"round": 4})
    monkeypatch.undo()
    assert trail_path(tmp_path).read_bytes() == before and verify_trail(tmp_path).intact


def test_acknowledging_an_intact_trail_is_refused(tmp_path: Path) -> None:
    filled(tmp_path)
    with pytest.raises(AuditTrailError, match="intact: there is nothing to acknowledge"):
        acknowledge_break(tmp_path, "reviewed")


def test_an_acknowledgement_needs_a_reason(tmp_path: Path) -> None:
    with pytest.raises(AuditTrailError, match="needs a reason"):
        acknowledge_break(tmp_path, "  ")


def test_a_trail_another_process_changed_is_verified_again_before_appending(tmp_path: Path) -> None:
    trail = filled(tmp_path)
    content = lines(tmp_path)
    rewrite(tmp_path, content[:1] + content[2:])
    with pytest.raises(AuditTrailBrokenError):
        trail.confirmed("upload", "key-9")


def test_a_destination_is_recorded_without_user_info_or_query() -> None:
    assert public_url("https://user:secret@platform.example:8443/api?token=abc#x") == "https://platform.example:8443/api"
    assert public_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


def test_an_entry_inside_an_acknowledged_break_is_kept_but_proves_nothing_as_an_anchor(tmp_path: Path) -> None:
    head = filled(tmp_path).head
    assert head is not None
    content = lines(tmp_path)
    content[2] = content[2].replace(b'"bytes":101', b'"bytes":999')
    rewrite(tmp_path, content)
    acknowledge_break(tmp_path, "reviewed")
    result = verify_trail(tmp_path)
    assert result.intact and holds(result, head) and not head_covers(result, head)
    AuditTrail(tmp_path, expected_head=head).sending("upload", "next", {"round": 4})


def test_a_nan_metric_or_a_numpy_number_is_recorded_not_a_failed_round(tmp_path: Path) -> None:
    AuditTrail(tmp_path).sending("metrics", "key", {"metrics": {"loss": float("nan"), "accuracy": np.float32(0.5)},
                                                    "shape": (3, 4)})
    [entry] = read_entries(tmp_path)
    assert entry["facts"] == {"metrics": {"loss": "nan", "accuracy": 0.5}, "shape": [3, 4]}
    assert verify_trail(tmp_path).intact
