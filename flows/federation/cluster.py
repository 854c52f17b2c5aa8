"""The Dask cluster under a simulated federation: which workers leave it and why, bringing a local
cluster back to its size, and whether it can run a round's draw at once.

A Dask worker whose connection to the scheduler breaks closes itself and tells its nanny to close
too, so the nanny does not restart it; a `LocalCluster` forgets it `distributed.deploy.
lost-worker-timeout` (15 s) later and kills its process if a task still runs there ("Worker process
still alive after 4.0 seconds, killing"). Dask reschedules the lost worker's tasks on the workers
left, but a round's leaves wait for each other's uploads: were the workers left full, the moved
leaves would start only once the round had closed at its deadline without them. So the simulation
watches the cluster while a round runs: each worker that leaves is said once in the log, with the
scheduler's record of why and the leaves it was running, and a local cluster gets a new worker at
once for each one gone for good (a worker its nanny is restarting is left to the nanny).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from prefect_branchkey.bk_blocks.errors import MissingExtraError
from prefect_branchkey.tasks import run_logger

try:
    import distributed
    from distributed.core import Status
except ImportError as exc:
    raise MissingExtraError("A simulated federation", "simulation", exc) from None

# A nanny in one of these states will not start its worker again.
NANNY_GONE = frozenset({Status.closing, Status.closing_gracefully, Status.closed, Status.failed})
# How long a round may wait for the cluster to run its whole draw at once, in seconds (a new
# local worker starts in a few seconds; a remote deployment may take longer to replace one).
CAPACITY_WAIT_S = 120.0
CAPACITY_POLL_S = 1.0
# What the scheduler's stimulus for removing a worker means, for the log.
REMOVALS = MappingProxyType({
    "handle-worker-cleanup": "its connection to the scheduler closed (handle-worker-cleanup)",
    "check-worker-ttl": "no heartbeat within distributed.scheduler.worker-ttl (check-worker-ttl)",
})


class ClusterWatch:
    """Follows the workers of the simulation's Dask cluster from one look (`check`) to the next.

    `client` is the simulation's Dask client; its `cluster` is the `LocalCluster` the simulation
    started (restored to its size when workers are lost), or None for a cluster reached by address
    (only watched: its own deployment replaces workers). `needed` is a round's draw, the tasks the
    cluster must run at once. `leaves` names the task keys of the round running (key: leaf and
    round), so that a departure says whose rounds Dask moves."""

    def __init__(self, client: Any, needed: int) -> None:
        self.client, self.needed = client, needed
        self.cluster = getattr(client, "cluster", None)
        self.leaves: dict[str, str] = {}
        self.workers: dict[str, int] = dict(client.nthreads())
        self.running: dict[str, frozenset[str]] = {}
        self.started: set[Any] = set()
        self.replaced: set[Any] = set()

    @property
    def threads(self) -> int:
        """Tasks the cluster runs at once, as of the last look."""
        return sum(self.workers.values())

    def check(self) -> int:
        """Look at the cluster once: log each worker that left since the last look (with its reason
        and the leaves it was running), start replacements for the local workers gone for good,
        and note what each worker runs now. Returns how many workers left."""
        now = dict(self.client.nthreads())
        gone = [address for address in self.workers if address not in now]
        for address in gone:
            self._report(address)
        self._restore()
        self.workers = now
        self.running = {address: frozenset(map(str, keys)) for address, keys in self.client.processing().items()}
        return len(gone)

    def wait_for_capacity(self, timeout_s: float | None = None) -> bool:
        """Whether the cluster runs `needed` tasks at once within `timeout_s` (default
        CAPACITY_WAIT_S), looking once a second, so a local cluster is restored meanwhile."""
        deadline = time.monotonic() + (CAPACITY_WAIT_S if timeout_s is None else timeout_s)
        self.check()
        while self.threads < self.needed and time.monotonic() < deadline:
            time.sleep(CAPACITY_POLL_S)
            self.check()
        return self.threads >= self.needed

    def _report(self, address: str) -> None:
        """Say once that the worker at `address` left, why, and whose rounds Dask runs again."""
        moved = sorted(self.leaves[key] for key in self.running.get(address, frozenset()) if key in self.leaves)
        rounds = (f" while running the rounds of {', '.join(moved)}: Dask runs them again on the other workers, "
                  "each resuming from its leaf's work dir") if moved else ""
        run_logger(__name__).warning("Dask worker %s left the cluster (%s)%s", address, self._reason(address), rounds)

    def _reason(self, address: str) -> str:
        """Why the worker at `address` left, from the scheduler's events: the worker's own reason
        when it could still send it, else what made the scheduler remove it."""
        try:
            events = [message for _, message in self.client.get_events(address) if isinstance(message, Mapping)]
        except (OSError, TimeoutError) as exc:
            return f"the scheduler's events could not be read: {exc}"
        closing = [str(m.get("reason")) for m in events if m.get("action") == "closing-worker"]
        removed = [str(m.get("stimulus_id", "")) for m in events if m.get("action") == "remove-worker"]
        if closing:
            return f"it closed itself: {closing[-1]}"
        if removed:
            stimulus = removed[-1].rsplit("-", 1)[0]
            return f"the scheduler removed it: {REMOVALS.get(stimulus, stimulus)}"
        return "the scheduler recorded no reason"

    def _restore(self) -> None:
        """Start a new worker in a local cluster for each one gone for good (its nanny closing or
        closed, or forgotten by the cluster, so nothing starts it again; a worker whose nanny has
        not started yet is not gone). The specs are replaced on the cluster's event loop;
        `scale` to the same size then has the cluster close the old nanny (killing a process a
        task still holds) and start the new worker."""
        cluster = self.cluster
        if cluster is None or not hasattr(cluster, "worker_spec") or cluster.status != Status.running:
            return
        nannies = dict(cluster.workers)
        self.started.update(nannies)
        gone = [name for name in list(cluster.worker_spec) if name in self.started and name not in self.replaced
                and (name not in nannies or nannies[name].status in NANNY_GONE)]
        if not gone:
            return
        self.replaced.update(gone)

        def replace() -> None:
            for name in gone:
                # The new spec first: a name is new only to the spec, and the gone worker's must not come back.
                cluster.worker_spec.update(cluster.new_worker_spec())
                cluster.worker_spec.pop(name, None)
            cluster.scale(len(cluster.worker_spec))

        cluster.loop.add_callback(replace)
        run_logger(__name__).warning("starting %d new Dask worker(s) in place of worker(s) %s, which their nannies "
                                     "will not restart", len(gone), ", ".join(map(str, gone)))


def dask_client_of(task_runner: Any) -> Any | None:
    """The Dask client of a Prefect task runner when it is a `DaskTaskRunner`, else None."""
    client = getattr(task_runner, "client", None)
    return client if isinstance(client, distributed.Client) else None
