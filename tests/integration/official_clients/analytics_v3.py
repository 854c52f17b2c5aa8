"""One leaf's statistics round with the official branchkey 3.0 client (`save_analytics` + `file_upload`).

Run by tests/integration/test_official_analytics.py in the venv holding only `branchkey==3.0.*`.
Usage: analytics_v3.py CREDENTIALS_JSON HOST SEED OUT_DIR
"""

import json
import sys
import time
import warnings

import numpy as np
from branchkey import APIConfig, Client, Credentials

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from site_columns import columns  # noqa: E402

credentials_path, host, seed, out_dir = sys.argv[1:5]
credentials = Credentials.from_dict(json.load(open(credentials_path)))
client = Client(credentials, api_config=APIConfig(host=host, ssl=False), output_dir=out_dir)
deadline = time.time() + 30
while getattr(client._ws_consumer, "_ws", None) is None and time.time() < deadline:
    time.sleep(0.05)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    file_path = client.save_analytics(columns(int(seed)), file_path=f"{out_dir}/analytics_{seed}")
file_id = client.file_upload(file_path)
aggregation_id = client.queue.get(timeout=60)
path = client.file_download(aggregation_id)
with np.load(path, allow_pickle=False) as combined:
    fields = {name: combined[name].tolist() for name in combined.files if name != "__bk_payload_kind__"}
client.close()
print(json.dumps({"file_id": file_id, "aggregation_id": aggregation_id, "path": path, "fields": fields}))
