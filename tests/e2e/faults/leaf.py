"""One fault-suite leaf in its own process: `federated-training` up to ROUNDS rounds.

Usage: python -m tests.e2e.faults.leaf CREDENTIALS_JSON HOST TRANSPORT WORK_DIR ROUNDS SIZE WEIGHTING AGG_TIMEOUT

With FAULT_KILL_AT=<round>:<phase> the process SIGKILLs itself right after it saved that
state (a kill at an exact step, not wherever a timer lands); with <round>:upload-accepted, once
the platform accepted that round's upload and before the audit trail confirms it. With
FAULT_AGGREGATION_TIMEOUT_S it waits that long for an aggregation instead of AGG_TIMEOUT. It
prints the results as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import prefect_branchkey.flows.round
from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.leaf.audit import AuditTrail
from prefect_branchkey.flows.leaf.state import LeafState
from prefect_branchkey.flows.training import federated_training

PARTICIPANT = "tests.e2e.faults.participant:NoisyModel"


def kill_after_saving(round_number: int, phase: str) -> None:
    """Make the round's state saves SIGKILL this process once it saved (round, phase)."""
    save = prefect_branchkey.flows.round.save_state

    def save_then_die(work_dir: Path, state: LeafState) -> None:
        save(work_dir, state)
        if (state.round, state.phase) == (round_number, phase):
            os.kill(os.getpid(), signal.SIGKILL)

    prefect_branchkey.flows.round.save_state = save_then_die


def kill_before_confirming_upload(round_number: int) -> None:
    """Make the audit trail SIGKILL this process when it is about to confirm that round's upload
    (the platform has accepted it; the trail holds only its `sending` entry)."""
    confirmed = AuditTrail.confirmed

    def die_before_confirming(trail: AuditTrail, kind: str, key: str, facts: dict[str, object] | None = None) -> str:
        if kind == "upload" and f".round{round_number}." in key:
            os.kill(os.getpid(), signal.SIGKILL)
        return confirmed(trail, kind, key, facts)

    AuditTrail.confirmed = die_before_confirming  # type: ignore[method-assign]


if __name__ == "__main__":
    credentials_path, host, transport, work_dir, rounds, size, weighting, timeout = sys.argv[1:9]
    if os.environ.get("FAULT_KILL_AT"):
        kill_round, kill_phase = os.environ["FAULT_KILL_AT"].split(":")
        if kill_phase == "upload-accepted":
            kill_before_confirming_upload(int(kill_round))
        else:
            kill_after_saving(int(kill_round), kill_phase)
    block = BranchKeyCredentials.from_platform_json(json.loads(Path(credentials_path).read_text()), host=host,
                                                    notification_transport=transport, amqp_host="127.0.0.1")
    results = federated_training(block, PARTICIPANT, work_dir, rounds=int(rounds),
                                 participant_options={"size": int(size), "weighting": float(weighting)},
                                 aggregation_timeout_s=float(os.environ.get("FAULT_AGGREGATION_TIMEOUT_S", timeout)))
    if isinstance(results, list):
        print(json.dumps([{"status": r.status, "round": r.round} for r in results]))
    else:
        print(json.dumps({"state": results.type.value, "message": results.message}))
