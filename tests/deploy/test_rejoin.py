"""A SuperNode stopped by SIGTERM in the middle of a deployed run and started again with the same
key rejoins under the same node id, and the run completes with it."""

import json

from tests.deploy.conftest import DEPLOY_RUN, history, wait_for

ROUNDS = 3


def test_killed_supernode_restarts_rejoins_and_the_run_completes(deployment, tmp_path):
    node_id = deployment.node_ids["node-2"]
    overrides = [*DEPLOY_RUN, f"federation.rounds={ROUNDS}", f"run_dir={tmp_path}"]
    run_id = deployment.start_run(overrides)
    wait_for(lambda: len(history(tmp_path)) >= 2, 240, "round 1 to be recorded", interval=0.5)

    old = deployment.processes.running["node-2"]
    deployment.processes.stop("node-2")
    rows_when_gone = len(history(tmp_path))
    assert old.poll() is not None
    deployment.wait_status(node_id, "offline")
    deployment.start_node("node-2", deployment.node_args["node-2"])
    deployment.wait_status(node_id, "online")

    info = deployment.wait_run(run_id)
    assert info["status"] == "finished:completed", info.get("status-details")
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = history(tmp_path)
    print(f"rejoin run: gone after {rows_when_gone - 1} rounds; history {rows}")
    assert summary["rounds_completed"] == ROUNDS
    # node-2 was gone before round 2 was recorded, so the final round was sampled after it came
    # back (min_clients=2 makes every round wait for both nodes): its reply there came from the
    # restarted process.
    assert rows_when_gone == 2, f"node-2 stopped only after round {rows_when_gone - 1}"
    assert rows[-1]["sampled"] == rows[-1]["replied"] == 2
