"""Archive compatibility with the official branchkey 3.0 client, both ways, with no server.

Writes SEED's columns with `save_analytics` to OFFICIAL_OUT, and validates OURS (an archive this
project wrote) with the official `validate_weight_shape`, printing what the official client reads in it.
Usage: archive_compat_v3.py SEED OFFICIAL_OUT OURS
"""

import json
import sys
import warnings

import numpy as np
from branchkey import Client

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from site_columns import columns  # noqa: E402

seed, official_out, ours = int(sys.argv[1]), sys.argv[2], sys.argv[3]
client = Client.__new__(Client)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    written = client.save_analytics(columns(seed), file_path=official_out)
with open(ours, "rb") as handle:
    valid = client.validate_weight_shape(handle)
    kind = Client._read_declared_kind(handle)
with np.load(ours, allow_pickle=False) as archive:
    read = {name: [archive[name].dtype.str, list(archive[name].shape), archive[name].tolist()] for name in archive.files}
print(json.dumps({"written": written, "valid": valid, "kind": kind, "read": read}))
