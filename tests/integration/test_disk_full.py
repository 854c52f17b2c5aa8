"""A full disk on a real small filesystem (a tmpfs the size of a few updates): writing an update,
downloading an aggregate, and a whole round against a real bk-server. Each fails with
`DiskFullError` naming the file and the bytes, leaves no partial file, and the round completes
once space is freed, from the step it stopped at."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from prefect_branchkey.bk_blocks import BranchKeyClient, files
from prefect_branchkey.bk_blocks.archive import npz_size, read_aggregate, write_update
from prefect_branchkey.bk_blocks.errors import DiskFullError
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.state import load_state
from prefect_branchkey.flows.participant import Participant, TrainResult
from prefect_branchkey.flows.round import run_round
from prefect_branchkey.tasks import LeafSession

from ..support.bkserver import BkServer, credentials_for
from ..support.tmpfs import SmallDisk, small_disk

DISK_BYTES = 8 * 1024 * 1024
LAYER_ELEMENTS = 512 * 1024  # float32: a 2 MiB update, a 2 MiB aggregate


def layers(seed: int = 0) -> list[np.ndarray]:
    """A model of one 2 MiB layer of random (incompressible) values."""
    return [np.random.default_rng(seed).normal(size=LAYER_ELEMENTS).astype(np.float32)]


UPDATE_BYTES = npz_size({"weighting": np.array([1.0]), "layer_0": layers()[0]})


class Large(Participant):
    """Trains a 2 MiB model: a step from the global model."""

    metrics: ClassVar[dict[str, str]] = {"loss": "min"}

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        return TrainResult(10.0, [(global_model or layers())[0] + np.float32(0.01)])

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        return {"loss": float(np.abs(global_model[0]).mean())}


@dataclass(frozen=True)
class Aggregate:
    """A round aggregated on a real server, and a client of its leaf to download it."""

    client: BranchKeyClient
    aggregation_id: str
    size: int


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """The test's work dir on a tmpfs of DISK_BYTES."""
    with small_disk(tmp_path / "disk", DISK_BYTES) as mounted:
        yield mounted


@pytest.fixture
def aggregate(server: BkServer, tmp_path: Path) -> Iterator[Aggregate]:
    """One leaf's round, uploaded and aggregated; its size read from a download beside the tmpfs."""
    federation = server.federation(leaves=1)
    with credentials_for(server, federation.leaves[0]).get_client() as client:
        mark = client.mark()
        client.upload(write_update(tmp_path / "update.npz", 10.0, layers()))
        aggregation_id = client.wait_for_aggregation(30, after=mark).aggregation_id
        size = client.download(aggregation_id, tmp_path / "reference").stat().st_size
        yield Aggregate(client, aggregation_id, size)


def test_update_write_on_full_disk_names_path_and_bytes(disk: SmallDisk) -> None:
    disk.fill(UPDATE_BYTES // 2)
    free = disk.free()
    target = disk.root / "updates" / "run1-round1.npz"
    with pytest.raises(DiskFullError) as raised:
        write_update(target, 10.0, layers())
    assert str(raised.value).startswith(
        f"disk full writing {target}: it needs {UPDATE_BYTES:,} bytes (2.0 MiB) and {free:,} bytes")
    assert (raised.value.errno, raised.value.needed_bytes, raised.value.free_bytes) == (errno.ENOSPC, UPDATE_BYTES,
                                                                                         free)


def test_update_that_fills_the_disk_midway_leaves_no_partial_file(disk: SmallDisk) -> None:
    """A compressed archive's size is not known beforehand: the disk fills up while it is written."""
    disk.fill(UPDATE_BYTES // 2)
    free = disk.free()
    with pytest.raises(DiskFullError, match=f"it needs more than the {free:,} bytes .* free on that filesystem"):
        write_update(disk.root / "updates" / "run1-round1.npz", 10.0, layers(), compress=True)
    assert list((disk.root / "updates").iterdir()) == [] and disk.free() == free


def test_download_larger_than_free_space_is_refused_before_writing(disk: SmallDisk, aggregate: Aggregate,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    disk.fill(aggregate.size // 2)
    free = disk.free()
    monkeypatch.setattr(BranchKeyClient, "_receive", lambda *args: pytest.fail("the body was read"))
    with pytest.raises(DiskFullError) as raised:
        aggregate.client.download(aggregate.aggregation_id, disk.root / "models")
    target = disk.root / "models" / f"{aggregate.aggregation_id}.npz"
    assert str(raised.value).startswith(f"disk full writing {target}: it needs {aggregate.size:,} bytes")
    assert raised.value.free_bytes == free and list((disk.root / "models").iterdir()) == []


def test_download_on_full_disk_leaves_no_partial_file(disk: SmallDisk, aggregate: Aggregate,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """As when the reply has no Content-Length, or another process fills the disk meanwhile: the
    free space is not checked first, so the disk fills up midway through the download."""
    disk.fill(aggregate.size // 2)
    free = disk.free()
    monkeypatch.setattr(files, "ensure_space", lambda path, size: None)
    with pytest.raises(DiskFullError, match=f"it needs {aggregate.size:,} bytes .* and {free:,} bytes"):
        aggregate.client.download(aggregate.aggregation_id, disk.root / "models")
    assert list((disk.root / "models").iterdir()) == [] and disk.free() == free


def test_download_completes_once_space_is_freed(disk: SmallDisk, aggregate: Aggregate) -> None:
    disk.fill(aggregate.size // 2)
    with pytest.raises(DiskFullError):
        aggregate.client.download(aggregate.aggregation_id, disk.root / "models")
    disk.free_up()
    path = aggregate.client.download(aggregate.aggregation_id, disk.root / "models")
    assert path.stat().st_size == aggregate.size and read_aggregate(path)[0].shape == (LAYER_ELEMENTS,)


def one_leaf(server: BkServer, open_session: Callable[..., LeafSession]) -> tuple[str, LeafSession]:
    """A one-leaf federation's branch id and its leaf's session."""
    federation = server.federation(leaves=1)
    return federation.branch_id, open_session(credentials_for(server, federation.leaves[0]))


def test_round_resumes_after_space_freed(server: BkServer, disk: SmallDisk, prefect_api: str,
                                         open_session: Callable[..., LeafSession]) -> None:
    """Room for the update but not for the aggregate: the round fails at the download, and the
    rerun downloads it without training or uploading again."""
    branch_id, session = one_leaf(server, open_session)
    disk.fill(UPDATE_BYTES + UPDATE_BYTES // 2)
    with pytest.raises(DiskFullError, match=f"disk full writing {disk.root / 'models'}/"):
        run_round(session, Large(), disk.root)
    stopped = load_state(disk.root, session.credentials.leaf_id)
    assert stopped.phase == "aggregated" and list((disk.root / "models").iterdir()) == []

    disk.free_up()
    result = run_round(session, Large(), disk.root)
    assert (result.status, result.round) == ("completed", 1)
    assert result.global_model == str(disk.root / "models" / f"{stopped.aggregation_id}.npz")
    assert server.status(branch_id)["rounds"][0]["updates"] == 1
    assert [(row["round"], row["status"]) for row in history_rows(disk.root)] == [(1, "completed")]


def test_round_whose_update_did_not_fit_completes_after_space_freed(
        server: BkServer, disk: SmallDisk, prefect_api: str, open_session: Callable[..., LeafSession]) -> None:
    """No room for the update: nothing is uploaded or counted, and the rerun trains the round again."""
    branch_id, session = one_leaf(server, open_session)
    disk.fill(UPDATE_BYTES // 2)
    with pytest.raises(DiskFullError, match=f"disk full writing {disk.root / 'updates' / 'run1-round1.npz'}: "):
        run_round(session, Large(), disk.root)
    assert load_state(disk.root, session.credentials.leaf_id).phase == "idle"
    assert list((disk.root / "updates").iterdir()) == []
    assert all(r["updates"] == 0 for r in server.status(branch_id)["rounds"])

    disk.free_up()
    result = run_round(session, Large(), disk.root)
    assert (result.status, result.round) == ("completed", 1)
    assert server.status(branch_id)["rounds"][0]["updates"] == 1
