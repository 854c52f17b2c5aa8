"""One leaf's round with the official branchkey 3.0 client (WebSocket notifications).

Run by tests/integration/test_official_clients.py in a separate venv holding only `branchkey==3.0.*`.
Usage: round_v3.py CREDENTIALS_JSON HOST SEED WEIGHTING OUT_DIR
"""

import json
import sys
import time

import numpy as np
from branchkey import APIConfig, Client, Credentials

credentials_path, host, seed, weighting, out_dir = sys.argv[1:6]
credentials = Credentials.from_dict(json.load(open(credentials_path)))
client = Client(credentials, api_config=APIConfig(host=host, ssl=False), output_dir=out_dir)
config = client.get_branch_config()
# WebSocket notices are live-only: wait until this leaf's socket is open before uploading,
# or the round could close (and be announced) before it listens.
deadline = time.time() + 30
while getattr(client._ws_consumer, "_ws", None) is None and time.time() < deadline:
    time.sleep(0.05)
rng = np.random.default_rng(int(seed))
parameters = [rng.normal(size=(6, 4)).astype(np.float32), np.array([int(seed), 3], dtype=np.int64)]
file_path = client.save_weights(f"{out_dir}/model_weights_{seed}", float(weighting), parameters)
file_id = client.file_upload(file_path)
aggregation_id = client.queue.get(timeout=60)
path = client.file_download(aggregation_id)
ok = client.send_performance_metrics(aggregation_id, json.dumps({"accuracy": 0.5}), "train")
client.close()
print(json.dumps({"file_id": file_id, "aggregation_id": aggregation_id, "metrics_sent": ok, "path": path,
                  "min_updates": config["branch"]["min_updates"]}))
