"""Retention: a leaf keeps its latest updates and global models, and never what it still needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from prefect_branchkey.flows.leaf.promotion import BEST_MODEL, SERVED_MODEL
from prefect_branchkey.flows.leaf.retention import RetentionSettings, apply_retention
from prefect_branchkey.flows.leaf.state import LeafState


def _file(path: Path, size: int = 10, age: int = 0) -> Path:
    """A file of `size` bytes, `age` seconds older than the newest (downloads are ordered by mtime)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    return path


def agg(number: int) -> str:
    """The file name of aggregation `number`: the platform's ids are UUIDs."""
    return f"00000000-0000-4000-8000-{number:012d}.npz"


def _rounds(work_dir: Path, count: int) -> None:
    """`count` rounds of run 1: each one's update and downloaded model, the newest last."""
    for number in range(1, count + 1):
        _file(work_dir / "updates" / f"run1-round{number}.npz")
        _file(work_dir / "models" / agg(number), age=count - number)


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_only_the_latest_updates_and_models_are_kept(tmp_path: Path) -> None:
    _rounds(tmp_path, 6)
    state = LeafState("leaf", run_number=1, round=7, global_model=str(tmp_path / "models" / agg(6)))
    pruned = apply_retention(tmp_path, state, RetentionSettings(keep_updates=2, keep_models=2))
    assert _names(tmp_path / "updates") == ["run1-round5.npz", "run1-round6.npz"]
    assert _names(tmp_path / "models") == [agg(5), agg(6)]
    assert (pruned.files, pruned.bytes) == (8, 80)


def test_updates_are_ordered_by_run_and_round_not_by_name(tmp_path: Path) -> None:
    for run, number in ((1, 9), (1, 10), (2, 1)):
        _file(tmp_path / "updates" / f"run{run}-round{number}.npz")
    apply_retention(tmp_path, LeafState("leaf", run_number=2, round=2), RetentionSettings(keep_updates=2))
    assert _names(tmp_path / "updates") == ["run1-round10.npz", "run2-round1.npz"]


def test_the_update_of_a_round_in_progress_is_kept(tmp_path: Path) -> None:
    _rounds(tmp_path, 3)
    state = LeafState("leaf", run_number=1, round=1, archive=str(tmp_path / "updates" / "run1-round1.npz"))
    apply_retention(tmp_path, state, RetentionSettings(keep_updates=1))
    assert _names(tmp_path / "updates") == ["run1-round1.npz", "run1-round3.npz"]


def test_the_held_best_and_served_models_are_never_deleted(tmp_path: Path) -> None:
    _rounds(tmp_path, 5)
    models = tmp_path / "models"
    os.link(models / agg(1), models / BEST_MODEL)
    os.link(models / agg(2), models / SERVED_MODEL)
    state = LeafState("leaf", run_number=1, round=6, global_model=str(models / agg(3)))
    apply_retention(tmp_path, state, RetentionSettings(keep_models=1))
    assert _names(models) == [agg(1), agg(2), agg(3), agg(5), BEST_MODEL, SERVED_MODEL]


def test_files_not_named_as_rounds_name_them_are_left_alone(tmp_path: Path) -> None:
    _rounds(tmp_path, 3)
    _file(tmp_path / "updates" / "my-notes.txt")
    _file(tmp_path / "updates" / "run1-round1.npz.bak")
    apply_retention(tmp_path, LeafState("leaf", run_number=1, round=4), RetentionSettings(keep_updates=1))
    assert _names(tmp_path / "updates") == ["my-notes.txt", "run1-round1.npz.bak", "run1-round3.npz"]


def test_none_keeps_every_update_and_model(tmp_path: Path) -> None:
    _rounds(tmp_path, 4)
    pruned = apply_retention(tmp_path, LeafState("leaf", run_number=1, round=5),
                             RetentionSettings(keep_updates=None, keep_models=None))
    assert pruned.files == 0 and len(_names(tmp_path / "updates")) == len(_names(tmp_path / "models")) == 4


def test_a_count_below_one_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError, match="keep_models"):
        RetentionSettings(keep_models=0)


def test_a_users_own_model_file_is_never_deleted(tmp_path: Path) -> None:
    _file(tmp_path / "models" / "pretrained.npz", age=100)
    _rounds(tmp_path, 3)
    apply_retention(tmp_path, LeafState("leaf", run_number=1, round=4), RetentionSettings(keep_models=1))
    assert _names(tmp_path / "models") == [agg(3), "pretrained.npz"]
