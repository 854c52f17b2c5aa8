"""The platform's rules: who may do what, how runs and rounds move, what a leaf is told.

The HTTP layer (`api.py`, `admin_api.py`) only translates requests into calls here; every
state change goes through `Platform`, under one lock, in one transaction of the store
(`store.py`, which holds all the SQL). Download URLs are signed in `signing.py`, WebSocket
tickets kept in `tickets.py`, and closed rounds aggregated by `scheduling.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from prefect_branchkey.bk_blocks.analytics import BUNDLE_COMBINERS, AnalyticsInfo
from prefect_branchkey.bk_blocks.archive import FEDERATED_ANALYTICS, FEDERATED_LEARNING, PAYLOAD_KINDS, UpdateInfo
from prefect_branchkey.bk_blocks.files import remove_temporaries
from prefect_branchkey.bk_blocks.protocol import METRIC_MODES, RUN_BLOCKED_TEXT, RUN_STATUSES
from prefect_branchkey.bk_server.analytics import (
    AnalyticsRejected,
    assignments_json,
    check_against,
    check_values,
    load_assignments,
    parse_assignments,
    schema_of,
)
from prefect_branchkey.bk_server.errors import (
    BadRequest,
    Forbidden,
    Gone,
    NotFound,
    RunBlocked,
    StaleRound,
    Unauthorized,
    UploadRejected,
)
from prefect_branchkey.bk_server.faults import crash_point
from prefect_branchkey.bk_server.fedavg import WeightedUpdate
from prefect_branchkey.bk_server.notifications import Notifier, aggregation_message, run_status_message
from prefect_branchkey.bk_server.scheduling import AggregationQueue, round_is_due, write_aggregate, write_combined
from prefect_branchkey.bk_server.settings import ServerSettings
from prefect_branchkey.bk_server.signing import DownloadSigner
from prefect_branchkey.bk_server.store import Aggregate, Branch, Leaf, Round, Store, Upload
from prefect_branchkey.bk_server.tickets import TicketBook

log = logging.getLogger(__name__)


def new_secret() -> str:
    """A fresh token in hex: it never starts with '-', so it is safe as a command-line argument."""
    return secrets.token_hex(32)


def hash_token(token: str) -> str:
    """Session tokens are kept only as SHA-256 hashes."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class LeafCredentials:
    """A leaf's credentials in the platform's official JSON shape."""

    id: str
    name: str
    session_token: str
    tree_id: str
    branch_id: str
    owner_id: str

    def as_json(self) -> dict[str, str]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"LeafCredentials(id={self.id!r}, name={self.name!r}, session_token='**********')"


@dataclass(frozen=True)
class StagedUpload:
    """An upload streamed to disk and described, not yet part of any round."""

    path: Path
    size: int
    digest: str
    info: UpdateInfo
    analytics: AnalyticsInfo | None = None


class BrokerProvisioner(Protocol):
    """What the platform needs from the broker side when leaves are created."""

    def provision(self, tree_id: str, branch_id: str, leaves: list[LeafCredentials]) -> None: ...


class Platform:
    """The local BranchKey platform: federation state, rounds, aggregation, notifications."""

    def __init__(
        self,
        settings: ServerSettings,
        store: Store,
        notifier: Notifier,
        provisioner: BrokerProvisioner | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self.provisioner = provisioner
        self.downloads = DownloadSigner(settings.signing_key_file, settings.download_url_ttl_s)
        self.tickets = TicketBook(settings.ws_ticket_ttl_s)
        self._lock = threading.RLock()
        self._aggregations = AggregationQueue(self._aggregate)

    def close(self) -> None:
        self._aggregations.close()

    # -- federation set-up -------------------------------------------------------------

    def create_federation(
        self,
        *,
        leaves: int,
        min_updates: int,
        tree_name: str = "tree",
        branch_name: str = "main",
        quorum: int | None = None,
        round_deadline_s: float | None = None,
        owner_id: str | None = None,
    ) -> tuple[str, str, list[LeafCredentials]]:
        """Create a tree, a branch and its leaves, provision them on the broker, start the run."""
        if leaves < 1:
            raise BadRequest("a federation needs at least one leaf")
        if not 1 <= min_updates <= leaves:
            raise BadRequest(f"min_updates must be between 1 and the number of leaves ({leaves}), got {min_updates}")
        if quorum is not None and not 1 <= quorum <= min_updates:
            raise BadRequest(f"quorum must be between 1 and min_updates ({min_updates}), got {quorum}")
        if round_deadline_s is not None and not (math.isfinite(round_deadline_s) and round_deadline_s > 0):
            raise BadRequest("round_deadline_s must be a positive number of seconds")
        tree_id, branch_id, owner = str(uuid.uuid4()), str(uuid.uuid4()), owner_id or str(uuid.uuid4())
        credentials = [
            LeafCredentials(str(uuid.uuid4()), f"{branch_name}-leaf-{i + 1}", new_secret(), tree_id, branch_id, owner)
            for i in range(leaves)
        ]
        if self.provisioner is not None:
            self.provisioner.provision(tree_id, branch_id, credentials)
        now = time.time()
        with self._lock, self.store.transaction() as db:
            self.store.insert_federation(db, (tree_id, tree_name, owner), (branch_id, branch_name),
                                         (min_updates, quorum, round_deadline_s),
                                         [(c.id, c.name, hash_token(c.session_token)) for c in credentials], now)
        self.set_run_status(branch_id, "start")
        return tree_id, branch_id, credentials

    # -- authentication ----------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Leaf:
        """The leaf behind `Authorization: Bearer <leaf_id>:<session_token>`, or 401."""
        if not authorization:
            raise Unauthorized("missing Authorization header")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or ":" not in credential:
            raise Unauthorized("Authorization must be 'Bearer <leaf_id>:<session_token>'")
        leaf_id, _, token = credential.strip().partition(":")
        leaf = self.store.leaf(leaf_id)
        expected = leaf.token_hash if leaf else hash_token(secrets.token_hex(16))
        if not hmac.compare_digest(expected, hash_token(token)) or leaf is None:
            raise Unauthorized("invalid leaf id or session token")
        return leaf

    def branch_for(self, leaf: Leaf, branch_id: str) -> Branch:
        """The branch a leaf asks about, refusing (403) any branch that is not its own."""
        if branch_id != leaf.branch_id:
            raise Forbidden("this leaf does not belong to that branch")
        return self.require_branch(branch_id)

    def require_branch(self, branch_id: str) -> Branch:
        """The branch, or 404."""
        branch = self.store.branch(branch_id)
        if branch is None:
            raise NotFound(f"no branch {branch_id}")
        return branch

    # -- run control -------------------------------------------------------------------

    def set_run_status(self, branch_id: str, action: str) -> Branch:
        """Start, pause or stop a branch's run and tell every leaf.

        Starting after a stop begins a new run (run_number + 1, round 1); starting after
        a pause resumes the same round. Stopping abandons the open round and discards its
        updates. A stopped run cannot be paused (so a later start is always a new run).
        """
        if action not in RUN_STATUSES:
            raise BadRequest(f"run action must be one of {', '.join(RUN_STATUSES)}, got {action!r}")
        discarded: list[Upload] = []
        with self._lock:
            branch = self.require_branch(branch_id)
            if action == "pause" and branch.run_status == "stop":
                raise BadRequest("a stopped run cannot be paused; start a new run instead")
            now = time.time()
            with self.store.transaction() as db:
                if action == "start" and branch.run_status == "stop":
                    self.store.begin_run(db, branch_id, branch.run_number + 1, now)
                elif action == "stop" and branch.run_status != "stop":
                    discarded = self.store.accepted_uploads(branch_id, branch.run_number, branch.round)
                    self.store.stop_run(db, branch, now)
                elif action != branch.run_status:
                    self.store.set_run_status(db, branch_id, action, now)
                text = run_status_message(action, **self._extras(run_number=self.store.run_number_of(db, branch_id)))
                self.notifier.stage(db, branch.tree_id, branch_id, text)
            branch = self.require_branch(branch_id)
            self._deliver(branch, text)
        self._remove_uploads(discarded)
        return branch

    def _remove_uploads(self, uploads: list[Upload]) -> None:
        """Delete the archives of uploads that no longer count (replaced or discarded)."""
        for upload in uploads:
            (self.settings.uploads_dir / f"{upload.file_id}.npz").unlink(missing_ok=True)

    # -- uploads and rounds ------------------------------------------------------------

    def check_can_upload(self, leaf: Leaf) -> Branch:
        """The leaf's branch if its run takes uploads (`start`), else 409 `run is blocked`."""
        branch = self.require_branch(leaf.branch_id)
        if branch.run_status != "start":
            raise RunBlocked(f"{RUN_BLOCKED_TEXT}: the branch's run is '{branch.run_status}', uploads need 'start'")
        return branch

    def find_idempotent(self, leaf: Leaf, key: str | None, digest: str) -> Upload | None:
        """The earlier upload that got this Idempotency-Key, if any."""
        if not key:
            return None
        earlier = self.store.upload_by_key(leaf.id, key)
        if earlier is None:
            return None
        if earlier.digest != digest:
            raise UploadRejected(
                "Idempotency-Key was already used by this leaf for a different archive; use a new key per archive"
            )
        return earlier

    def receipt(self, upload: Upload) -> dict[str, Any]:
        """The upload reply: the file id, plus (extra fields) the run and round it counts in and
        that round's aggregation once there is one, so a leaf knows what answers its upload."""
        if not self.settings.extensions:
            return {"file_id": upload.file_id}
        round_ = self.store.round(upload.branch_id, upload.run_number, upload.round)
        aggregated = round_ is not None and round_.status == "aggregated"
        return {"file_id": upload.file_id, "run_number": upload.run_number, "round": upload.round,
                "aggregation_id": round_.aggregation_id if aggregated and round_ else None}

    def accept_upload(self, leaf: Leaf, staged: StagedUpload, metadata: str | None, idempotency_key: str | None,
                      expected: tuple[int, int] | None = None) -> Upload:
        """Add a validated update to the branch's open round; close the round if it is full.

        `expected` is the (run, round) the leaf trained this update for (an extension): an
        update for a round that has closed is refused (`StaleRound`) instead of being counted
        in a later round it was not trained for.
        """
        signature = json.dumps([[list(s.shape), s.dtype] for s in staged.info.signature])
        with self._lock:
            existing = self.find_idempotent(leaf, idempotency_key, staged.digest)
            if existing is not None:
                staged.path.unlink(missing_ok=True)
                self._close_round_if_due(leaf.branch_id, time.time())
                return existing
            branch = self.check_can_upload(leaf)
            self.check_round(branch, expected)
            round_ = self._open_round(branch)
            accepted = self.store.accepted_uploads(branch.id, branch.run_number, branch.round)
            others = [u for u in accepted if u.leaf_id != leaf.id]
            self._check_kind(staged.info.kind, others)
            schema = None
            if staged.analytics is None:
                self._check_signature(round_, others, signature)
            else:
                schema = self._check_statistics(branch, round_, staged.analytics, staged.path, others)
                signature = round_.signature or ""
            upload = Upload(str(uuid.uuid4()), leaf.id, branch.id, branch.run_number, branch.round, "accepted",
                            staged.info.weighting, staged.size, staged.digest, metadata, idempotency_key or None,
                            time.time(), staged.info.kind)
            target = self.settings.uploads_dir / f"{upload.file_id}.npz"
            replaced = [u for u in accepted if u.leaf_id == leaf.id]
            staged.path.replace(target)
            try:
                with self.store.transaction() as db:
                    self.store.insert_upload(db, upload, signature, [u.file_id for u in replaced], schema)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            self._remove_uploads(replaced)
            log.info("round %s/%s of branch %s: update %s from leaf %s", branch.run_number, branch.round, branch.id,
                     upload.file_id, leaf.name)
            self._close_round_if_due(branch.id, time.time())
        return upload

    def check_round(self, branch: Branch, expected: tuple[int, int] | None) -> None:
        """Refuse (409 `stale_round`) an update trained for another run or round than the open one."""
        if expected is None or not self.settings.extensions or expected == (branch.run_number, branch.round):
            return
        raise StaleRound(f"update is for run {expected[0]} round {expected[1]} but the platform is at run "
                         f"{branch.run_number} round {branch.round}: resync with the latest aggregate and train again")

    def _open_round(self, branch: Branch) -> Round:
        """The branch's current round row (created with the run, so always there)."""
        round_ = self.store.round(branch.id, branch.run_number, branch.round)
        if round_ is None:
            raise NotFound(f"round {branch.round} of run {branch.run_number} is missing from the database")
        return round_

    @staticmethod
    def _check_kind(kind: str, others: list[Upload]) -> None:
        """Refuse a payload of the other kind than the round's (learning and analytics never share a round)."""
        if any(u.kind != kind for u in others):
            held = next(u.kind for u in others if u.kind != kind)
            raise AnalyticsRejected(f"this round already holds {held} payloads; a {kind} payload cannot join it "
                                    f"(learning and analytics payloads never share a round) (payload_kind_mismatch)",
                                    "payload_kind_mismatch")

    def _check_statistics(self, branch: Branch, round_: Round, analytics: AnalyticsInfo, path: Path,
                          others: list[Upload]) -> str:
        """The payload's field schema (JSON) once it agrees with the branch's field operations, the
        run's frozen fields and, for `must_match` fields, the round's earlier payloads."""
        schema = schema_of(analytics, load_assignments(self.store.field_operations(branch.id)))
        if round_.analytics_schema is not None:
            check_against(json.loads(round_.analytics_schema), schema)
        check_values(path, schema, [self.settings.uploads_dir / f"{u.file_id}.npz" for u in others])
        return json.dumps(schema)

    def set_field_operations(self, branch_id: str, fields: Any) -> dict[str, Any]:
        """Assign the operations that combine a branch's named analytics fields (bundles need none).
        A run takes them with its first statistics payload, which freezes them with its fields; a run
        already frozen keeps its own and refuses payloads that would now combine otherwise."""
        self.require_branch(branch_id)
        assignments = parse_assignments(fields)
        self.store.set_field_operations(branch_id, assignments_json(assignments))
        return {name: a.as_json() for name, a in assignments.items()}

    @staticmethod
    def _check_signature(round_: Round, others: list[Upload], signature: str) -> None:
        """Refuse an update whose layers disagree with the round's (set by the run's first
        round and carried forward); only the first update of a run may set them."""
        if round_.signature is None or round_.signature == signature:
            return
        if round_.round == 1 and not others:
            return
        expected, got = json.loads(round_.signature), json.loads(signature)
        if len(expected) != len(got):
            raise UploadRejected(f"update has {len(got)} layers but this round's updates have {len(expected)}")
        for index, (want, have) in enumerate(zip(expected, got, strict=True)):
            if want != have:
                raise UploadRejected(
                    f"layer_{index} is shape {tuple(have[0])} dtype {np.dtype(have[1]).name} but this round's "
                    f"updates have shape {tuple(want[0])} dtype {np.dtype(want[1]).name}"
                )

    def _close_round_if_due(self, branch_id: str, now: float) -> bool:
        """Close the open round when min_updates leaves are in, or at the deadline with a quorum."""
        with self._lock:
            branch = self.require_branch(branch_id)
            leaves = {u.leaf_id for u in self.store.accepted_uploads(branch.id, branch.run_number, branch.round)}
            why = round_is_due(branch, len(leaves), now)
            if why is None:
                return False
            with self.store.transaction() as db:
                self.store.close_round(db, branch, str(uuid.uuid4()), now)
            log.info("round %s/%s of branch %s closed with %d leaves%s", branch.run_number, branch.round, branch.id,
                     len(leaves), "" if why == "full" else " (deadline reached with quorum)")
            self._aggregations.submit(branch.id, branch.run_number, branch.round)
            return True

    def close_overdue_rounds(self) -> None:
        """Close every round whose deadline has passed and that has its quorum."""
        now = time.time()
        for branch in self.store.branches():
            if branch.run_status == "start" and branch.round_deadline_s is not None:
                self._close_round_if_due(branch.id, now)

    def resume_after_restart(self) -> None:
        """After a restart: remove what an interrupted write left (a partial aggregate, a half-received
        upload), aggregate rounds closed but not aggregated, close rounds already full."""
        for directory in (self.settings.aggregates_dir, self.settings.uploads_dir):
            for path in remove_temporaries(directory):
                log.info("removed %s, left by an interrupted write", path.name)
        for path in self.settings.incoming_dir.glob("*.part"):
            path.unlink(missing_ok=True)
            log.info("removed %s, an upload cut short by the restart", path.name)
        for round_ in self.store.rounds_with_status("aggregating"):
            self._aggregations.submit(round_.branch_id, round_.run_number, round_.round)
        now = time.time()
        for branch in self.store.branches():
            if branch.run_status == "start":
                self._close_round_if_due(branch.id, now)

    def _aggregate(self, branch_id: str, run_number: int, round_number: int) -> None:
        """FedAvg of a closed round's updates; the aggregate and its notice commit together."""
        round_ = self.store.round(branch_id, run_number, round_number)
        if round_ is None or round_.status != "aggregating" or round_.aggregation_id is None:
            return
        uploads = self.store.accepted_uploads(branch_id, run_number, round_number)
        started = time.perf_counter()
        out = self.settings.aggregates_dir / f"{round_.aggregation_id}.npz"
        inputs = [WeightedUpdate(self.settings.uploads_dir / f"{u.file_id}.npz", u.weighting) for u in uploads]
        what = f"round {run_number}/{round_number} of branch {branch_id}"
        kind = uploads[0].kind if uploads else FEDERATED_LEARNING
        if kind == FEDERATED_ANALYTICS:
            write_combined([u.path for u in inputs], json.loads(round_.analytics_schema or "{}"), out, what)
        else:
            write_aggregate(inputs, out, what)
        if not out.exists():
            self.store.fail_round(branch_id, run_number, round_number)
            return
        branch = self.require_branch(branch_id)
        extras = {"kind": kind} if kind == FEDERATED_ANALYTICS else {}
        text = aggregation_message(round_.aggregation_id,
                                   **self._extras(run_number=run_number, round=round_number, updates=len(uploads),
                                                  **extras))
        with self._lock, self.store.transaction() as db:
            self.store.record_aggregate(db, Aggregate(round_.aggregation_id, branch_id, run_number, round_number,
                                                      len(uploads), out.stat().st_size, time.time(), kind))
            self.notifier.stage(db, branch.tree_id, branch_id, text)
        log.info("aggregated %s from %d updates in %.2f s", what, len(uploads), time.perf_counter() - started)
        crash_point("aggregate-committed")
        self._deliver(branch, text)

    def _extras(self, **fields: Any) -> dict[str, Any]:
        """Extra notice body fields (ignored by official clients), unless extensions are off."""
        return fields if self.settings.extensions else {}

    def _deliver(self, branch: Branch, text: str) -> None:
        """Send a committed notification to every leaf of the branch."""
        leaf_ids = [leaf.id for leaf in self.store.leaves_of_branch(branch.id)]
        self.notifier.deliver(branch.id, leaf_ids, text)

    # -- downloads ---------------------------------------------------------------------

    def aggregate_for(self, leaf: Leaf, file_id: str) -> Path:
        """The aggregate archive a leaf may download, refusing others' branches."""
        if not file_id or "/" in file_id or "\\" in file_id or ".." in file_id:
            raise BadRequest("file_id must be a bare name")
        aggregate = self.store.aggregate(file_id)
        if aggregate is None:
            raise NotFound(f"no aggregate with id {file_id}")
        if aggregate.branch_id != leaf.branch_id:
            raise Forbidden("that aggregate belongs to another branch")
        return self.settings.aggregates_dir / f"{file_id}.npz"

    def verify_download(self, file_id: str, branch_id: str, expires: str, signature: str) -> Path:
        """The archive a pre-signed URL names, if its signature holds and it has not expired."""
        self.downloads.check(file_id, branch_id, expires, signature)
        aggregate = self.store.aggregate(file_id)
        if aggregate is None or aggregate.branch_id != branch_id:
            raise NotFound(f"no aggregate with id {file_id}")
        path = self.settings.aggregates_dir / f"{file_id}.npz"
        if not path.exists():
            raise Gone(f"aggregate {file_id} is no longer stored")
        return path

    # -- metrics, config, WebSocket tickets --------------------------------------------

    def record_metrics(self, leaf: Leaf, body: Any, idempotency_key: str | None = None) -> None:
        """Store a leaf's performance metrics after checking every field names the leaf's own; a
        repeat with the same Idempotency-Key (a resend after a crash) is stored once."""
        if not isinstance(body, dict):
            raise BadRequest("metrics body must be a JSON object")
        missing = [k for k in ("mode", "aggregation_id", "leaf_id", "branch_id", "tree_id", "data") if k not in body]
        if missing:
            raise BadRequest(f"metrics body is missing {', '.join(missing)}")
        if body["mode"] not in METRIC_MODES:
            raise BadRequest(f"mode must be one of {', '.join(METRIC_MODES)}, got {body['mode']!r}")
        if (body["leaf_id"], body["branch_id"], body["tree_id"]) != (leaf.id, leaf.branch_id, leaf.tree_id):
            raise Forbidden("metrics must name the sending leaf, its branch and its tree")
        data = body["data"]
        try:
            parsed = json.loads(data) if isinstance(data, str) else None
        except json.JSONDecodeError as exc:
            raise BadRequest(f"metrics 'data' is not valid JSON: {exc.msg}") from None
        if not isinstance(parsed, dict):
            raise BadRequest("metrics 'data' must be a JSON string holding an object")
        aggregation_id = str(body["aggregation_id"])
        if body["mode"] != "non-federated":
            aggregate = self.store.aggregate(aggregation_id)
            if aggregate is None or aggregate.branch_id != leaf.branch_id:
                raise NotFound(f"no aggregation {aggregation_id} in this branch")
        key = idempotency_key if self.settings.extensions else None
        if not self.store.add_metrics(leaf, aggregation_id, body["mode"], data, key):
            log.info("metrics %s of leaf %s already stored; repeat ignored", idempotency_key, leaf.name)

    def run_view(self, branch: Branch) -> dict[str, Any]:
        """The run details reply: status and number, plus (extra fields, which official clients
        ignore) the open round, the rounds of the run being aggregated now and the branch's latest
        aggregation, so a leaf that missed a notice or was restored from an old state can tell
        where the federation is (and that a round closed without an aggregate failed)."""
        if not self.settings.extensions:
            return {"run_status": branch.run_status, "run_number": branch.run_number}
        latest = self.store.latest_aggregate(branch.id)
        statistics = self.store.latest_aggregate(branch.id, FEDERATED_ANALYTICS)
        aggregating = self.store.aggregating_rounds(branch.id, branch.run_number)
        ref = lambda a: None if a is None else {  # noqa: E731
            "aggregation_id": a.id, "run_number": a.run_number, "round": a.round}
        return {"run_status": branch.run_status, "run_number": branch.run_number, "round": branch.round,
                "aggregating": aggregating, "latest_aggregation": ref(latest), "latest_statistics": ref(statistics)}

    def branch_config(self, branch: Branch) -> dict[str, Any]:
        """The 3.x branch config document: branch, service, model_config and timestamps."""
        iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
        return {
            "branch": {
                "id": branch.id, "name": branch.name, "tree_id": branch.tree_id,
                "run_status": branch.run_status, "run_number": branch.run_number, "round": branch.round,
                "min_updates": branch.min_updates, "quorum": branch.quorum, "round_deadline_s": branch.round_deadline_s,
            },
            "service": {"aggregation": "fedavg", "payload_kinds": list(PAYLOAD_KINDS),
                        "max_upload_bytes": self.settings.max_upload_bytes,
                        "analytics": {"bundle_combiners": dict(BUNDLE_COMBINERS),
                                      "field_operations": {name: a.as_json() for name, a in load_assignments(
                                          self.store.field_operations(branch.id)).items()}}},
            "model_config": {},
            "created_at": iso(branch.created_at),
            "updated_at": iso(branch.updated_at),
        }

    def redeem_ticket(self, ticket_id: str, request_id: str) -> Leaf:
        """Use up a WebSocket ticket, returning its leaf; a used, unknown or expired one is refused."""
        leaf = self.store.leaf(self.tickets.redeem(ticket_id, request_id))
        if leaf is None:
            raise Unauthorized("the ticket's leaf no longer exists")
        return leaf

    # -- inspection (admin) ------------------------------------------------------------

    def branch_status(self, branch_id: str) -> dict[str, Any]:
        branch = self.require_branch(branch_id)
        rounds = []
        for r in self.store.rounds_of_branch(branch_id):
            uploads = self.store.accepted_uploads(branch_id, r.run_number, r.round)
            aggregate = self.store.aggregate(r.aggregation_id) if r.aggregation_id else None
            rounds.append({"run_number": r.run_number, "round": r.round, "status": r.status,
                           "aggregation_id": r.aggregation_id, "leaves": sorted({u.leaf_id for u in uploads}),
                           "updates": len(uploads), "opened_at": r.opened_at, "closed_at": r.closed_at,
                           "aggregated_at": aggregate.created_at if aggregate else None})
        return {"branch": self.branch_config(branch)["branch"], "rounds": rounds,
                "metrics": self.store.metrics_of_branch(branch_id)}

