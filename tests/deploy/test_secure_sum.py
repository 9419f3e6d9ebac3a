"""SecAgg+ over a real deployment: `flwr run` on the loopback SuperLink, two SuperNodes running
fedpeft's deployed ClientApp with its secure-sum mods, one round of client-level DP."""

import json
import math

import pytest

from tests.deploy.conftest import DEPLOY_RUN, history

SECURE = ["client_dp=eps3", "client_dp.clipping=fixed", "client_dp.clip_norm=0.5"]


def test_a_deployed_round_is_securely_aggregated(deployment, tmp_path):
    run_dir = tmp_path / "secure"
    overrides = [*DEPLOY_RUN, *SECURE, "secagg.enabled=true", "federation.rounds=1"]
    run_id = deployment.start_run([*overrides, f"run_dir={run_dir}"])
    info = deployment.wait_run(run_id)
    if info["status"] != "finished:completed":
        pytest.fail(f"run {run_id} ended {info['status']}: {info.get('status-details')}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["client_level_rounds"] == 1
    assert 0 < summary["client_level_epsilon"] <= 3.0 * (1 + 1e-6)
    (row,) = history(run_dir)[1:]
    # both nodes' masked vectors entered the sum; nothing about their data came back in clear
    assert int(row["replied"]) == 2 and int(row["failed"]) == 0
    assert math.isnan(row["train_loss"]) and json.loads(row["client_train_loss"]) == {}
    assert int(row["bytes_up"]) > 0
