"""SecAgg+ over a real deployment: `flwr run` on the loopback SuperLink, two SuperNodes running
fedpeft's deployed ClientApp with its secure-sum mods, two rounds of client-level DP. In round 1
node-2 drops out while it trains (before its masked vector is sent): with one node left below
SecAgg+'s threshold of 2 the round halts, releases noise alone and still counts as a round of the
mechanism; the run goes on and round 2 sums both nodes' masked updates. (Dropouts that leave
enough nodes to unmask the sum: tests/test_secure_sum.py, over the same workflow and mods.)"""

import json
import math

import pytest

from tests.deploy.conftest import DEPLOY_RUN, drop_flag, history

SECURE = ["client_dp=eps3", "client_dp.clipping=fixed", "client_dp.clip_norm=0.5"]


def test_a_deployed_run_is_securely_aggregated_through_a_dropout(deployment, tmp_path):
    run_dir = tmp_path / "secure"
    overrides = [*DEPLOY_RUN, *SECURE, "secagg.enabled=true", "federation.rounds=2"]
    flag = drop_flag(deployment)
    flag.touch()  # node-2's first local round fails
    try:
        run_id = deployment.start_run([*overrides, f"run_dir={run_dir}"])
        info = deployment.wait_run(run_id)
    finally:
        flag.unlink(missing_ok=True)
    if info["status"] != "finished:completed":
        pytest.fail(f"run {run_id} ended {info['status']}: {info.get('status-details')}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["client_level_rounds"] == 2
    assert 0 < summary["client_level_epsilon"] <= 3.0 * (1 + 1e-6)
    dropped, summed = history(run_dir)[1:]
    print(f"secure deployed run: {dropped} then {summed}")
    # round 1: the dropout left one masked vector, too few to unmask: no sum, every node failed
    assert int(dropped["sampled"]) == 2 and int(dropped["replied"]) == 0
    assert int(dropped["failed"]) == 2
    # round 2: both nodes' masked vectors entered the sum; nothing about their data in clear
    assert int(summed["replied"]) == 2 and int(summed["failed"]) == 0
    assert math.isnan(summed["train_loss"]) and json.loads(summed["client_train_loss"]) == {}
    assert int(summed["bytes_up"]) > 0
