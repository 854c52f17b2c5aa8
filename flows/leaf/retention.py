"""How much of its past a leaf keeps on disk: the latest K uploaded updates and global models.

Every round writes its update (`updates/run<N>-round<M>.npz`) and downloads a global model
(`models/<aggregation>.npz`); with a 1 GB model and a round a night, that is about 730 GB a
year. After each round that ended, the older ones are deleted, except what the leaf still
needs or promises: the global model it holds (the next round trains from it), the update of a
round in progress, and the best and the served model (`models/best.npz`, `models/serving.npz`,
and the download they are linked from). The history rows keep every round's digests and
facts: what is deleted is the bytes, never the record of them.

Only files named as the rounds name them are ever deleted (`run<N>-round<M>.npz`, and a
download's `<aggregation id>.npz`, the id being the platform's UUID); anything else in those
folders is the user's. Retention never fails a round: a file it cannot read or delete is logged
and left for the next round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from prefect_branchkey.flows.leaf.promotion import BEST_MODEL, SERVED_MODEL
from prefect_branchkey.flows.leaf.state import LeafState
from prefect_branchkey.tasks import run_logger

UPDATE_NAME = re.compile(r"run(\d+)-round(\d+)\.npz")
DOWNLOAD_NAME = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\.npz")


class RetentionSettings(BaseModel):
    """How many past updates and global models a leaf keeps (a flow parameter, one group in the
    UI). None keeps them all."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Retention")

    keep_updates: int | None = Field(
        5, ge=1, description="The latest uploaded updates kept in updates/; None: every one.")
    keep_models: int | None = Field(
        5, ge=1, description="The latest downloaded global models kept in models/, besides the one the leaf "
                             "holds, the best and the served one (always kept); None: every one.")


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted."""

    files: int
    bytes: int


def apply_retention(work_dir: Path, state: LeafState, settings: RetentionSettings) -> Pruned:
    """Delete the updates and global models past the settings' counts, keeping what the leaf
    still needs; safe to repeat, and a file that cannot be read or deleted is left for the next
    pass (logged, never raised)."""
    logger = run_logger(__name__)
    try:
        updates = _old_updates(work_dir / "updates", state, settings.keep_updates)
        models = _old_models(work_dir / "models", state, settings.keep_models)
    except OSError as exc:
        logger.warning("retention: could not list the old updates and models (%s); the next round tries again", exc)
        return Pruned(0, 0)
    files = size = 0
    for path in (*updates, *models):
        try:
            length = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("retention: could not delete %s (%s); the next round tries again", path, exc)
            continue
        files, size = files + 1, size + length
    if files:
        logger.info("retention: deleted %d old update(s) and model(s), %.1f MB", files, size / 1e6)
    return Pruned(files, size)


def _old_updates(directory: Path, state: LeafState, keep: int | None) -> list[Path]:
    """The round updates past the latest `keep` by (run, round), never the one a round uploads."""
    if keep is None or not directory.is_dir():
        return []
    named = sorted((tuple(map(int, match.groups())), path) for path in directory.iterdir()
                   if (match := UPDATE_NAME.fullmatch(path.name)))
    needed = {Path(state.archive).name} if state.archive else set()
    return [path for _, path in named[:-keep] if path.name not in needed]


def _old_models(directory: Path, state: LeafState, keep: int | None) -> list[Path]:
    """The downloaded global models past the latest `keep` by download time, never the one the
    leaf holds nor the file the best or the served model is linked from."""
    if keep is None or not directory.is_dir():
        return []
    promised = [directory / name for name in (BEST_MODEL, SERVED_MODEL) if (directory / name).exists()]
    downloads = sorted((path for path in directory.iterdir() if DOWNLOAD_NAME.fullmatch(path.name)),
                       key=lambda path: path.stat().st_mtime_ns)
    held = Path(state.global_model).name if state.global_model else None
    return [path for path in downloads[:-keep]
            if path.name != held and not any(path.samefile(other) for other in promised)]
