"""The test worker's one multiprocessing fork server, shared by the fault suite's leaf runs and the
simulation tests' Dask workers.

Python has one fork server per process, with one preload list, started by the first process
forked from it; whoever sets the list last before that start decides what every later child has
already imported. So the list is drawn here once, for both users: the modules a fault leaf
imports and those a Dask worker running a simulated leaf imports. Each child is still a fresh OS
process with its own pid and memory; only imports are shared, and nothing has run in the server.

A child starts with the environment the server had when it started (a fault leaf replaces it with
its own; a Dask task carries the submitter's Prefect settings with it). Dask's nanny sets its
pre-spawn variables (one BLAS thread, among others) only when it is the one that starts the server.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager

# What a fault leaf run imports (tests/e2e/faults/launcher.py), then what a Dask worker of a
# simulated federation imports (distributed, and the leaf's round as a Dask task runs it).
PRELOAD = ("prefect_branchkey.flows.training", "prefect_branchkey.flows.round", "tests.e2e.faults.participant",
           "prefect.flow_engine", "prefect.task_engine",
           "distributed", "prefect_dask", "prefect_branchkey.flows.federation.simulation")
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(list(PRELOAD))


@contextmanager
def dask_workers_forked() -> Iterator[None]:
    """Dask's worker processes forked from the fork server while inside, instead of spawned.

    Dask's default, spawn, starts an interpreter that imports Prefect and our flows again for each
    worker (seconds of CPU each); the spawn path stays covered by the simulation benchmark's e2e test,
    which runs outside pytest's process. Dask sets its own preload list on its first use of the fork
    server; the shared one is set again after it."""
    import dask
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context()
        CONTEXT.set_forkserver_preload(list(PRELOAD))
        yield
