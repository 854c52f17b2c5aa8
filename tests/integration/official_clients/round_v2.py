"""One leaf's round with the official branchkey 2.7 client, as its README shows.

Run by tests/integration/test_official_clients.py in a separate venv holding only `branchkey==2.7.*`.
Usage: round_v2.py CREDENTIALS_JSON HOST SEED WEIGHTING OUT_DIR
"""

import json
import os
import sys
import time

import numpy as np
from branchkey.client import Client

credentials_path, host, seed, weighting, out_dir = sys.argv[1:6]
credentials = json.load(open(credentials_path))
os.chdir(out_dir)
client = Client(credentials, host=host, rbmq_host="127.0.0.1", ssl=False)
rng = np.random.default_rng(int(seed))
parameters = [rng.normal(size=(6, 4)).astype(np.float32), np.array([int(seed), 3], dtype=np.int64)]
file_path = client.save_weights(f"model_weights_{seed}", float(weighting), parameters)
file_id = client.file_upload(file_path)
deadline = time.time() + 60
while client.queue.empty():
    if time.time() > deadline:
        sys.exit("no aggregation notice within 60 s")
    time.sleep(0.1)
aggregation_id = client.queue.get(block=False)
client.file_download(aggregation_id)
ok = client.send_performance_metrics(aggregation_id, json.dumps({"accuracy": 0.5}), "test")
client.close()
print(json.dumps({"file_id": file_id, "aggregation_id": aggregation_id, "metrics_sent": ok,
                  "path": os.path.join(out_dir, "aggregated_output", f"{aggregation_id}.npz"),
                  "run_status": client.run_status, "run_number": client.run_number}))
