"""Run one leaf's `federated-round` in its own process, so a test can kill it mid-round.

Usage: python -m tests.leaf_process CREDENTIALS_JSON HOST TRANSPORT WORK_DIR
"""

from __future__ import annotations

import json
import sys

from bk_blocks import BranchKeyCredentials
from flows.round import federated_round

if __name__ == "__main__":
    credentials_path, host, transport, work_dir = sys.argv[1:5]
    block = BranchKeyCredentials.from_platform_json(json.load(open(credentials_path)), host=host,
                                                    notification_transport=transport, amqp_host="127.0.0.1")
    result = federated_round(block, "flows.examples.digits:DigitsSoftmax", work_dir,
                             participant_options={"leaf_index": 0, "leaves": 2})
    print(json.dumps({"status": result.status, "round": result.round}))
