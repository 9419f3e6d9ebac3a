"""The node's budget against a server that asks again: concurrent messages in real processes, new
runs (new run ids) over the same data, and deleted per-run state; none spends past the cap."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.clients.client_app import train
from fedpeft.clients.client_data import data_fingerprint
from fedpeft.config import compose_config
from fedpeft.federation import build_task
from fedpeft.privacy import BudgetExhausted, LedgerFile, PrivacyLedger
from tests.conftest import FAST_RUN, REPO

NODE = {"partition-id": 0, "num-partitions": 2}
STEPS = 3
SIGMA = 1.0


@pytest.fixture(scope="module")
def task():
    cfg = compose_config(
        [
            *FAST_RUN,
            "dp=eps3",
            f"federation.local_steps={STEPS}",
            "train.batch_size=16",
            f"dp.noise_multiplier={SIGMA}",
            "dp.target_epsilon=100",
        ]  # fmt: skip
    )
    return build_task(cfg, 2, ["negative", "positive"])


def _epsilon_after(rounds: int, n: int = 200) -> float:
    """Epsilon of `rounds` rounds of STEPS steps at SIGMA, as the node's ledger counts it."""
    ledger = PrivacyLedger(SIGMA, 16 / n, 1e-5, 100.0, "prv", n)
    return ledger.epsilon(rounds * STEPS)


def _cap_for(rounds: int) -> float:
    """A cap that admits exactly `rounds` rounds (halfway to the next round's epsilon)."""
    return (_epsilon_after(rounds) + _epsilon_after(rounds + 1)) / 2


def _asking(task: dict, epsilon: float) -> dict:
    """The task with its target epsilon at the node's cap (a larger one would be refused)."""
    return {**task, "dp": {**task["dp"], "target_epsilon": epsilon}}


def _send(task: dict, node_config: dict, run_id: int = 1) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    config = ConfigRecord({"task": json.dumps(task), "server-round": 1})
    msg = Message(
        RecordDict({"arrays": ArrayRecord(), "config": config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    context = Context(
        run_id=run_id, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
    )
    return train(msg, context)


#: One SuperNode-spawned ClientApp process: waits for the start file, then sends one train message.
WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from tests.clients.test_budget_attacks import _send
    from fedpeft.privacy import BudgetExhausted
    task, node = json.loads({task!r}), json.loads({node!r})
    go = Path({go!r})
    while not go.exists():
        time.sleep(0.01)
    try:
        _send(task, node)
        print("trained")
    except BudgetExhausted:
        print("refused")
    """
)


def test_concurrent_messages_to_one_node_spend_at_most_its_cap(task, tmp_path):
    """Two nodes at once, in real processes: one gets 2 messages and admits 1 round, the other 3
    and admits 2 (one launch for both: the processes' imports dominate the time)."""
    go = tmp_path / "go"
    launched = []
    for messages, fit in ((2, 1), (3, 2)):
        cap = _cap_for(fit)
        node = {**NODE, "state-dir": str(tmp_path / f"state-{messages}"), "dp-epsilon": cap}
        script = WORKER.format(
            repo=str(REPO), task=json.dumps(_asking(task, cap)), node=json.dumps(node), go=str(go)
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
            for _ in range(messages)
        ]
        launched.append((messages, fit, cap, node, procs))
    time.sleep(1.0)
    go.touch()  # all at once: every process is past its imports or close to it
    for messages, fit, cap, node, procs in launched:
        outcomes = [p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert outcomes.count("trained") == fit and outcomes.count("refused") == messages - fit
        saved = LedgerFile(node["state-dir"], 1, data_fingerprint(task, NODE)).load()
        ledger = PrivacyLedger._load(saved)
        assert ledger.steps == fit * STEPS
        assert ledger.epsilon() <= cap


def test_new_run_ids_over_the_same_data_stop_at_the_lifetime_cap(task, tmp_path):
    """A server that starts run after run (or a SuperLink that hands out fresh run ids) gets no
    more than the lifetime cap; deleting the runs' other per-run state changes nothing."""
    lifetime = _cap_for(3)
    task = _asking(task, _cap_for(2))
    node = {
        **NODE,
        "state-dir": str(tmp_path),
        "dp-epsilon": _cap_for(2),  # one run may take two rounds
        "dp-lifetime-epsilon": lifetime,  # all runs together three
    }
    outcomes = []
    for run_id in (11, 11, 11, 12, 12, 13):
        try:
            _send(task, node, run_id)
            outcomes.append((run_id, "trained"))
        except BudgetExhausted as exc:
            outcomes.append((run_id, "lifetime" if "lifetime" in str(exc) else "run"))
        for per_run in tmp_path.glob("run-*"):  # e.g. local factor files: not the ledger
            shutil.rmtree(per_run)
    assert outcomes == [
        (11, "trained"),
        (11, "trained"),
        (11, "run"),  # the run's own cap
        (12, "trained"),  # a new run: the lifetime cap still has one round
        (12, "lifetime"),
        (13, "lifetime"),
    ]
    store = LedgerFile(tmp_path, 13, data_fingerprint(task, NODE))
    assert sorted(store.runs()) == [11, 12] and not store.exists()
    total = sum(PrivacyLedger._load(f).steps for f in store.runs().values())
    assert total == 3 * STEPS


def test_other_data_has_its_own_ledger_and_a_file_node_is_keyed_by_its_bytes(task, tmp_path):
    other = {"partition-id": 1, "num-partitions": 2}
    assert data_fingerprint(task, NODE) != data_fingerprint(task, other)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("text,label\nhello,positive\n")
    b.write_text("text,label\nhello,positive\n")
    same = data_fingerprint(task, {"data-path": str(a)})
    assert same == data_fingerprint({}, {"data-path": str(b)})  # the task does not matter
    b.write_text("text,label\nhello,negative\n")
    assert data_fingerprint(task, {"data-path": str(b)}) != same
