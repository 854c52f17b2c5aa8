"""Federated statistics with the official branchkey 3.0 client: its `save_analytics` archives and
ours are interchangeable, and its upload combines with two leaves of this project's client into
exactly the pooled statistics of every site's raw columns."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from prefect_branchkey.bk_blocks.analytics import BUNDLE_SUFFIXES, read_fields, summarize, write_statistics
from prefect_branchkey.bk_blocks.client import BranchKeyClient, ConnectionOptions, read_platform_credentials

from ..support.bkserver import BkServer
from .test_official_clients import SCRIPTS, official_python

sys.path.insert(0, str(SCRIPTS))
from site_columns import columns


def official(script: str, *args: str) -> dict:
    result = subprocess.run([str(official_python("3.0")), str(SCRIPTS / script), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_official_and_our_statistics_archives_are_interchangeable(tmp_path: Path) -> None:
    ours = write_statistics(tmp_path / "ours.npz", columns(1))
    reply = official("archive_compat_v3.py", "1", str(tmp_path / "official"), str(ours))
    assert reply["valid"] is True and reply["kind"] == "federated_analytics"
    theirs = Path(reply["written"])
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.namelist() == b.namelist()
        assert [i.compress_type for i in a.infolist()] == [i.compress_type for i in b.infolist()]
        assert all(a.read(name) == b.read(name) for name in a.namelist())
    ours_fields, their_fields = read_fields(ours), read_fields(theirs)
    assert list(ours_fields) == list(their_fields) == [f"{c}_{s}" for c in ("age", "visits") for s in BUNDLE_SUFFIXES]
    assert {name: value.tolist() for name, value in ours_fields.items()} == \
        {name: reply["read"][name][2] for name in ours_fields}


def test_official_client_statistics_combine_with_ours_to_the_pooled_statistics(server: BkServer,
                                                                               tmp_path: Path) -> None:
    federation = server.federation(leaves=3)
    creds = tmp_path / "leaf0.json"
    creds.write_text(json.dumps(federation.leaves[0]))
    (tmp_path / "out0").mkdir()
    process = subprocess.Popen([str(official_python("3.0")), str(SCRIPTS / "analytics_v3.py"), str(creds), server.url,
                                "0", str(tmp_path / "out0")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ids = []
    for seed in (1, 2):
        identity, token = read_platform_credentials(federation.leaves[seed])
        with BranchKeyClient(identity, token, ConnectionOptions(host=server.url)) as client:
            archive = client.write_statistics(tmp_path / f"stats{seed}.npz", columns(seed))
            ids.append(client.upload(archive))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    reply = json.loads(stdout.strip().splitlines()[-1])
    identity, token = read_platform_credentials(federation.leaves[1])
    with BranchKeyClient(identity, token, ConnectionOptions(host=server.url)) as client:
        combined = read_fields(client.download_statistics(reply["aggregation_id"], tmp_path / "down"), combined=True)
    assert {name: value.tolist() for name, value in combined.items()} == reply["fields"]
    for column in ("age", "visits"):
        pooled = np.concatenate([np.asarray(columns(seed)[column], dtype=np.float64) for seed in range(3)])
        present = pooled[~np.isnan(pooled)]
        summary = summarize(combined, column)
        assert (summary.n, summary.nan) == (present.size, pooled.size - present.size)
        assert (summary.min, summary.max) == (present.min(), present.max())
        np.testing.assert_allclose(summary.mean, present.mean(), rtol=1e-14)
        np.testing.assert_allclose(summary.variance, present.var(), rtol=1e-12)
    assert combined["age_n"].dtype == np.int64 and combined["age_sum"].dtype == np.float64
