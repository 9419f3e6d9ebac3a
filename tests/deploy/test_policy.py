"""A deployed node holds every task to its own privacy policy: node-3 (dp-required, dp-epsilon=3)
refuses a run started with dp=off; the reason reaches history.csv and the run completes on the
others. (That deployed nodes refuse dp.reproducible=true is shown on the same deployed train
handler in tests/clients/test_client_app.py: a second deployed run here cost CI 45 s.)"""

import json

import pytest

from fedpeft import certs
from tests.deploy.conftest import DEPLOY_RUN, history, state_dir


@pytest.fixture
def strict_node(deployment, tmp_path):
    """node-3: partition 0 of the task's data, a policy that requires DP; gone after the test."""
    keys = certs.make_node_keys(tmp_path, "node-3")
    node_id = deployment.register(keys.public)
    node_config = (
        f'partition-id=0 num-partitions=2 dp-required=true dp-epsilon=3 state-dir="'
        f'{state_dir(deployment, "node-3")}"'
    )
    deployment.start_node("node-3", deployment.node_argv("node-3", keys.private, node_config))
    try:
        deployment.wait_status(node_id, "online")
        yield 0  # its name: its partition id
    finally:
        deployment.processes.stop("node-3")
        deployment.flwr("supernode", "unregister", str(node_id), "deploy")


def _run(deployment, run_dir, *overrides: str) -> list[dict]:
    run_id = deployment.start_run(
        [*DEPLOY_RUN, "federation.rounds=1", f"run_dir={run_dir}", *overrides]
    )
    info = deployment.wait_run(run_id)
    assert info["status"] == "finished:completed", info.get("status-details")
    return history(run_dir)


def test_a_dp_requiring_node_refuses_a_run_without_dp_and_the_run_goes_on(
    deployment, strict_node, tmp_path
):
    others = {str(deployment.node_ids["node-1"]), "1"}  # node-1 by its node id, node-2 by partition
    rows = _run(deployment, tmp_path / "off")
    failures = json.loads(rows[1]["failures"])
    print(f"dp=off with a DP-requiring node: {rows[1]}")
    assert rows[1]["sampled"] == 3 and rows[1]["replied"] == 2 and set(failures) == {"0"}
    assert failures["0"].startswith("node policy dp-epsilon=3 refuses a task with dp.enabled=false")
    assert set(json.loads(rows[1]["client_train_loss"])) == others
    assert not state_dir(deployment, "node-3").exists()  # refused before any ledger was opened
