"""`LeafSession`: what a leaf's tasks share for the length of a flow run, passed to each of them.

One client, whose notification listener must run from before an upload until its
aggregation is seen; the notice-stream mark taken before each round's upload; and a
logger that writes to whichever Prefect run is current (the task's, else the flow's).
"""

from __future__ import annotations

from typing import Any

import requests

from prefect_branchkey.bk_blocks import BranchKeyClient, BranchKeyCredentials, BranchKeyError, BranchKeySettings
from prefect_branchkey.tasks.loggers import CurrentRunLogger, run_logger

# The credentials parameter that means: read BRANCHKEY_* settings on the machine that runs the flow.
FROM_ENVIRONMENT = "$env"


def resolve_credentials(credentials: BranchKeyCredentials | str) -> BranchKeyCredentials:
    """The Block itself, the saved Block of that name, or, for `"$env"`, the Block that the
    `BRANCHKEY_*` environment of this machine describes (the token never leaves the machine)."""
    if isinstance(credentials, BranchKeyCredentials):
        return credentials
    if credentials == FROM_ENVIRONMENT:
        return BranchKeySettings().to_block()
    # Block.load is sync_compatible, typed for both callers: from sync code it returns the Block.
    return BranchKeyCredentials.load(credentials)  # type: ignore[return-value]


class LeafSession:
    """One leaf's credentials and open client, and the marks of the rounds it is uploading.

    Open it once per flow run (`with LeafSession.open(credentials) as session:`) and pass it
    to every task: its listener then sees every notice from the first upload to the last
    aggregation, and the mark `upload_weights` takes before a fresh round's upload is the one
    `wait_for_aggregation` reads.
    """

    def __init__(self, credentials: BranchKeyCredentials) -> None:
        self.credentials = credentials
        self.client: BranchKeyClient = credentials.get_client(
            logger=CurrentRunLogger("prefect_branchkey.bk_blocks.client"))
        # By (run, round): the notice stream's mark, and how many run status notices had come then.
        self._marks: dict[tuple[int, int], tuple[int, int]] = {}
        self._branch_name: str | None = None
        # Extra fields of the aggregation notices that answered this session's rounds, by aggregation
        # id (a platform's extension: bk-server says how many updates it averaged).
        self.notice_extras: dict[str, dict[str, Any]] = {}

    @classmethod
    def open(cls, credentials: BranchKeyCredentials | str) -> LeafSession:
        """A session for the Block, the saved Block of that name, or `"$env"`."""
        return cls(resolve_credentials(credentials))

    def __repr__(self) -> str:
        return f"LeafSession(leaf={self.credentials.leaf_name!r})"

    def __enter__(self) -> LeafSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the listener and release the client's connections."""
        self.client.close()

    @property
    def branch_name(self) -> str:
        """The branch's name as the platform knows it, asked once per session; its id when the
        platform gives no name or cannot be asked (said once in the log: a round never fails
        over a label)."""
        if self._branch_name is None:
            try:
                self._branch_name = self.client.branch_name() or self.credentials.branch_id
            except (BranchKeyError, requests.RequestException, ValueError, KeyError) as exc:
                run_logger(__name__).warning("could not read the branch's name from the platform (%s); using "
                                             "its id %s", exc, self.credentials.branch_id)
                self._branch_name = self.credentials.branch_id
        return self._branch_name

    def mark_round(self, run_number: int, round_number: int) -> None:
        """Mark the notice stream before a round's first upload attempt (a retry keeps the first
        mark: the aggregation answering an upload accepted before the retry comes after it)."""
        if (run_number, round_number) not in self._marks:
            self._marks[(run_number, round_number)] = (self.client.mark(), self.client.run_status_notices)

    def mark_of(self, run_number: int, round_number: int) -> int | None:
        """The round's mark (None when the upload was not marked: a resumed round); it stays
        until the round's aggregation is known, so a retried wait reads the same one."""
        marked = self._marks.get((run_number, round_number))
        return marked[0] if marked else None

    def status_notices_at_mark(self, run_number: int, round_number: int) -> int | None:
        """How many run status notices had come when the round was marked (None: not marked), so
        that a wait begun after a notice (a stop between upload and wait) checks the run at once."""
        marked = self._marks.get((run_number, round_number))
        return marked[1] if marked else None

    def forget_mark(self, run_number: int, round_number: int) -> None:
        """Drop a round's mark once its aggregation is known."""
        self._marks.pop((run_number, round_number), None)
