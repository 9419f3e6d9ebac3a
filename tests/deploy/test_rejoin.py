"""A private deployed run goes on through misbehaving and restarting nodes, and every node stays
within its own budget. One run (dp=eps3 planned for 2 rounds, 3 rounds) serves all of it, since
CI time is short:

- round 1: node-1 claims more examples than it declared: its reply is rejected with the reason,
  and the epsilon it spent still counts;
- before round 2 (the server held): node-2 is stopped by SIGTERM and started again with the same
  key and state directory: it rejoins under the same node id and name, and its ledger goes on
  from where it stopped;
- before round 3: node-1 is stopped, its state directory wiped, and started again: its fresh
  ledger reports less than before, and the server rejects the reply as a reset;
- round 3: node-2 has spent its budget: it refuses, at the target, like a node that never
  restarted.
"""

import json
import shutil

from fedpeft.privacy import PRIVATE_REPLY_METRICS
from tests.deploy.conftest import (
    DEPLOY_RUN,
    NODE_1_ROWS,
    history,
    hold_round,
    overclaim_flag,
    state_dir,
    wait_for,
)

ROUNDS = 3
PRIVATE = ["dp=eps3", "dp.planned_rounds=2"]


def _restart(deployment, name: str, wipe: bool = False) -> None:
    node_id = deployment.node_ids[name]
    old = deployment.processes.running[name]
    deployment.processes.stop(name)
    assert old.poll() is not None
    deployment.wait_status(node_id, "offline")
    if wipe:
        shutil.rmtree(state_dir(deployment, name))
    deployment.start_node(name, deployment.node_args[name])
    deployment.wait_status(node_id, "online")


def _epsilons(rows: list[dict], client: str) -> list[float]:
    return [
        json.loads(r["client_epsilon"])[client]
        for r in rows[1:]
        if client in json.loads(r["client_epsilon"])
    ]


def test_private_nodes_keep_their_budget_through_overclaims_restarts_and_resets(
    deployment, tmp_path
):
    node_1, node_2 = str(deployment.node_ids["node-1"]), "1"  # node-2 is named by its partition
    wire = deployment.root / "wire.jsonl"
    offset = wire.stat().st_size if wire.exists() else 0
    overrides = [*DEPLOY_RUN, *PRIVATE, f"federation.rounds={ROUNDS}", f"run_dir={tmp_path}"]
    holds = [hold_round(deployment, r) for r in (2, 3)]
    for hold in holds:
        hold.touch()
    flag = overclaim_flag(deployment)
    flag.touch()  # node-1's first local round (round 1) claims NODE_1_ROWS + 1
    try:
        run_id = deployment.start_run(overrides)
        wait_for(lambda: len(history(tmp_path)) >= 2, 240, "round 1 to be recorded", interval=0.5)
        _restart(deployment, "node-2")
        holds[0].unlink()
        wait_for(lambda: len(history(tmp_path)) >= 3, 240, "round 2 to be recorded", interval=0.5)
        _restart(deployment, "node-1", wipe=True)
        holds[1].unlink()
    finally:
        flag.unlink(missing_ok=True)
        for hold in holds:
            hold.unlink(missing_ok=True)

    info = deployment.wait_run(run_id)
    assert info["status"] == "finished:completed", info.get("status-details")
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = history(tmp_path)
    print(f"private rejoin run: history {rows}")
    assert summary["rounds_completed"] == ROUNDS
    assert set(summary["declared_examples"]) == {node_1, node_2}

    # Round 1: the overclaim is rejected, and its spending counted all the same.
    assert rows[1]["rejected"] == 1 and rows[1]["replied"] == 1
    assert json.loads(rows[1]["failures"]) == {
        node_1: f"num-examples={NODE_1_ROWS + 1} is more than the {NODE_1_ROWS} this client "
        "declared when it joined the run"
    }
    assert set(json.loads(rows[1]["client_epsilon"])) == {node_1, node_2}
    # Round 2: both train; node-2's reply comes from the restarted process, its ledger goes on.
    assert rows[2]["sampled"] == rows[2]["replied"] == 2 and rows[2]["failed"] == 0
    # Round 3: node-1's wiped ledger is a reset; node-2 refuses at its target.
    failures = json.loads(rows[3]["failures"])
    assert rows[3]["replied"] == 0
    assert failures[node_1].startswith(f"privacy ledger of client {node_1} was reset: dp-steps")
    assert failures[node_2].startswith("budget exhausted: ε would reach")
    eps_1, eps_2 = _epsilons(rows, node_1), _epsilons(rows, node_2)
    assert eps_2[0] < eps_2[1] and len(eps_2) == 2  # rising across the restart
    assert 2.9 <= eps_2[1] <= 3.0  # refused at the target, as without a restart
    assert eps_1[0] < eps_1[1] and eps_1[2] < eps_1[1]  # the reset reply reported less
    assert summary["max_epsilon"] == max(eps_1 + eps_2)
    # Nothing data-dependent crossed: no loss, no metric outside the private allow-list.
    with wire.open("rb") as handle:
        handle.seek(offset)
        messages = [json.loads(line) for line in handle.read().decode().splitlines()]
    replies = [m for m in messages if m["direction"] == "up" and not m["error"]]
    assert len(replies) == 2 + 2 + 1
    for reply in replies:
        assert set(reply["metrics"]["metrics"]) <= PRIVATE_REPLY_METRICS, reply["metrics"]
    assert all(r["train_loss"] != r["train_loss"] for r in rows[1:])  # NaN: blank in the csv
