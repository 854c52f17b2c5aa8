"""Run one leaf in its own process, so a test can kill it (or what it talks to) mid-round:
its `federated-round`, or with ROUNDS its `federated-training` up to that round.

Usage: python -m tests.support.leaf_process CREDENTIALS_JSON HOST TRANSPORT WORK_DIR [ROUNDS]
"""

from __future__ import annotations

import json
import sys

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.round import federated_round
from prefect_branchkey.flows.training import federated_training

PARTICIPANT = "prefect_branchkey.flows.examples.digits:DigitsSoftmax"
OPTIONS = {"leaf_index": 0, "leaves": 2}

if __name__ == "__main__":
    credentials_path, host, transport, work_dir = sys.argv[1:5]
    with open(credentials_path) as credentials_file:
        platform_json = json.load(credentials_file)
    block = BranchKeyCredentials.from_platform_json(platform_json, host=host,
                                                    notification_transport=transport, amqp_host="127.0.0.1")
    if len(sys.argv) > 5:
        results = federated_training(block, PARTICIPANT, work_dir, rounds=int(sys.argv[5]),
                                     participant_options=OPTIONS, aggregation_timeout_s=300)
        print(json.dumps([{"status": r.status, "round": r.round} for r in results]))
    else:
        result = federated_round(block, PARTICIPANT, work_dir, participant_options=OPTIONS)
        print(json.dumps({"status": result.status, "round": result.round}))
