"""benchmarks/gpu_check.sh --dry-run: the GPU checks CPU-sized, one markdown table at the end."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_writes_the_table(tmp_path):
    pytest.importorskip("bitsandbytes")
    # client_sharing's dry run starts two Ray simulations (80 s here): left to the full dry run
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_ONLY": "aggregation,client_precision"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| check | status | wall s |" in table
    assert "| aggregation | " in table and "Traceback" not in table
    rows = json.loads((tmp_path / "client_precision.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fp32", "bf16", "4bit"]
    assert all(r["samples_per_s"] > 0 for r in rows)
    for mode in ("fp32", "bf16", "4bit"):
        assert f"| client round {mode} | ok |" in table


def test_unknown_check_is_refused(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_ONLY": "nothing"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "names no check" in done.stderr
