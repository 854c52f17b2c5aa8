"""The upload task: an update archive to the platform, retried safely.

A retried upload carries an idempotency key derived from the leaf, the run, the round
and the archive's digest, so however often it is retried (or a killed flow is rerun)
the platform counts the update once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_branchkey.bk_blocks.files import sha256_file
from prefect_branchkey.tasks.retries import RETRY_OPTIONS
from prefect_branchkey.tasks.session import LeafSession


@dataclass(frozen=True)
class UploadReceipt:
    """What the platform gave back for an upload: the file id and, when the platform says, the
    (run, round) it counts in and that round's aggregation if it already happened."""

    file_id: str
    idempotency_key: str
    sha256: str
    size: int
    counted_in: tuple[int, int] | None = None
    aggregation_id: str | None = None


def idempotency_key(leaf_id: str, run_number: int, round_number: int, sha256: str) -> str:
    """The same archive for the same leaf, run and round always gets the same key."""
    return f"{leaf_id}.run{run_number}.round{round_number}.{sha256[:40]}"


@task(name="upload_weights", task_run_name="upload-round-{round_number}", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def upload_weights(
    session: LeafSession, archive: Path, round_number: int, run_number: int, name_round: bool = False,
    mark: bool = True, sha256: str | None = None,
) -> UploadReceipt:
    """Upload an update archive for a round; return the platform's file id.

    With `mark` (a fresh round) the notice stream is marked before the first attempt, so that
    against a platform whose notices do not name their round, the aggregation answering this
    upload is the first one announced after it; a resumed round passes False (its upload may
    have been accepted, and answered, before the crash). With `name_round` (when `round_number`
    is the platform's round, as the round flow keeps it) the upload names its run and round, so
    a platform that knows them refuses it once that round has closed (`StaleRoundError`: resync)
    rather than counting it in a later one. `sha256` (hex) spares hashing the archive again when
    the caller already did (the round flow, for its audit trail).
    """
    logger = get_run_logger()
    if mark:
        session.mark_round(run_number, round_number)
    digest = bytes.fromhex(sha256) if sha256 else sha256_file(archive)
    key = idempotency_key(session.credentials.leaf_id, run_number, round_number, digest.hex())
    reply = session.client.upload_update(archive, idempotency_key=key, sha256=digest,
                                         for_round=(run_number, round_number) if name_round else None)
    logger.info("round %d: update %s accepted as %s", round_number, Path(archive).name, reply.file_id)
    counted_in = (reply.run_number, reply.round) if reply.run_number is not None and reply.round is not None else None
    if reply.aggregation_id:
        session.forget_mark(run_number, round_number)
    return UploadReceipt(reply.file_id, key, digest.hex(), Path(archive).stat().st_size, counted_in,
                         reply.aggregation_id)
