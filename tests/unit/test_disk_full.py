"""A full disk in the rules: what `DiskFullError` says, how a write turns ENOSPC into it and cleans
up, how large an archive is before it is written, and that the tasks do not retry it."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prefect_branchkey.bk_blocks import files
from prefect_branchkey.bk_blocks.archive import npz_size
from prefect_branchkey.bk_blocks.errors import BranchKeyError, DiskFullError, TransientError
from prefect_branchkey.bk_blocks.files import atomic_write, disk_full_cause
from prefect_branchkey.flows.leaf.promotion import SERVED_MODEL, _link
from prefect_branchkey.tasks.retries import retry_only_transient


class _FailedState:
    """What `retry_only_transient` reads: a state whose result raises `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self) -> Any:
        raise self.error


def test_message_names_the_path_the_bytes_needed_and_free() -> None:
    error = DiskFullError("/leaf/updates/run1-round3.npz", 67_109_120, 12_288)
    assert str(error) == (
        "disk full writing /leaf/updates/run1-round3.npz: it needs 67,109,120 bytes (64.0 MiB) and 12,288 bytes "
        "(12.0 KiB) are free on that filesystem. No partial file was kept; free space there and run the round "
        "again: it resumes from its last saved step")


def test_message_without_a_known_size_says_more_than_the_free_bytes() -> None:
    assert "it needs more than the 500 bytes free on that filesystem" in str(DiskFullError("/leaf/a.npz", None, 500))


def test_quota_exceeded_is_named_as_such() -> None:
    message = str(DiskFullError("/leaf/a.npz", 2048, 100_000, errno.EDQUOT))
    assert message.startswith("disk quota exceeded writing /leaf/a.npz") and "(the quota allows less)" in message


def test_is_an_os_error_with_its_errno_under_the_root() -> None:
    error = DiskFullError("/leaf/a.npz", 1, 0)
    assert isinstance(error, BranchKeyError) and isinstance(error, OSError) and not isinstance(error, TransientError)
    assert (error.errno, error.filename) == (errno.ENOSPC, "/leaf/a.npz")


def test_survives_pickling_with_its_message_and_numbers() -> None:
    error = DiskFullError("/leaf/a.npz", 4096, 10, errno.EDQUOT)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and (again.needed_bytes, again.free_bytes, again.errno) == (4096, 10, errno.EDQUOT)


def test_is_not_retried_by_the_tasks() -> None:
    assert retry_only_transient(None, None, _FailedState(DiskFullError("/leaf/a.npz", 1, 0))) is False
    assert retry_only_transient(None, None, _FailedState(TransientError("503"))) is True


def test_cause_is_found_behind_a_clean_up_error() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError:
            raise ValueError("closing the zip failed") from None
    except ValueError as hidden:
        assert disk_full_cause(hidden) is full
    assert disk_full_cause(OSError(errno.EACCES, "Permission denied")) is None


def test_enospc_in_a_write_raises_disk_full_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "models" / "agg.npz"
    with pytest.raises(DiskFullError) as raised, atomic_write(target, size=10) as handle:
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.path == str(target) and raised.value.needed_bytes == 10
    assert list(target.parent.iterdir()) == []


def test_a_write_known_not_to_fit_is_refused_before_any_file_exists(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match="it needs 1,001 bytes and 1,000 bytes are free"), \
            atomic_write(tmp_path / "a.npz", size=1001):
        pytest.fail("the body ran")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_unchanged(tmp_path: Path) -> None:
    with pytest.raises(PermissionError), atomic_write(tmp_path / "a.npz"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shapes", [[(3,)], [(1000, 1000), (7, 3, 2, 5, 9, 11, 13), (), (0,)], [(2**18,)] * 20])
def test_npz_size_bounds_the_archive_within_a_few_hundred_bytes_a_member(tmp_path: Path,
                                                                          shapes: list[tuple[int, ...]]) -> None:
    arrays = {"weighting": np.array([1.0])} | {f"layer_{i}": np.zeros(shape, np.float32) for i, shape in
                                                enumerate(shapes)}
    np.savez(tmp_path / "a.npz", **arrays)
    written = (tmp_path / "a.npz").stat().st_size
    assert written <= npz_size(arrays) <= written + 300 * len(arrays)


def _cross_device(source: object, target: object) -> None:
    """`os.link` across filesystems: no hard link possible."""
    raise OSError(errno.EXDEV, "Invalid cross-device link")


def test_a_model_copy_without_room_keeps_the_old_served_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where hard links are not possible the served model is copied; a disk without room for the
    copy fails naming the served model's path, and the old one stays whole."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "new.npz").write_bytes(b"n" * 5000)
    (models / SERVED_MODEL).write_bytes(b"old")
    monkeypatch.setattr(os, "link", _cross_device)
    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError, match=f"writing {models / SERVED_MODEL}: it needs 5,000 bytes"):
        _link(models / "new.npz", models / SERVED_MODEL)
    assert (models / SERVED_MODEL).read_bytes() == b"old" and sorted(p.name for p in models.iterdir()) == [
        "new.npz", SERVED_MODEL]
