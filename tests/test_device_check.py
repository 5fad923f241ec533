"""The prepared device check runs end to end in its dry form (tiny config, CPU) and writes its report."""
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_dry_device_check_writes_every_item(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run(["bash", "launch/device_check.sh", str(tmp_path), "--dry"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    names = [item["name"] for item in report["items"]]
    assert names[:2] == ["train auto", "train xla attention"] and "generation batch 8" in names
    assert all(item["status"] == "ok" for item in report["items"]), report["items"]
    assert report["items"][0]["result"]["tokens_per_s"] > 0 and report["versions"]["jax"]
    table = (tmp_path / "device_check.md").read_text()
    assert table.count("| ok |") == len(names) and "remat dots" in table
