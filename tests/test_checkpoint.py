"""Checkpoints after every round, and resume: a restored strategy continues exactly.

That a real run stopped and resumed through the CLI equals one never stopped is tested on FLoRA,
the method with the most server and client state: tests/clients/test_simulation.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import checkpoint
from fedpeft.cli import main
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.strategies import STRATEGIES
from tests.conftest import FAST_RUN
from tests.strategies.conftest import LAYERS, FakeGrid, R, global_adapter, reply

NODES = [11, 12, 13, 14]


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _strategy(name: str):
    tensors = global_adapter()
    if name == "fed_sb":
        for layer in range(LAYERS):
            tensors[f"enc.{layer}.q.lora_R"] = torch.zeros(R, R)
    params = {
        "fed_sb": {"init": "orthonormal"},
        "flora": {"ranks": [2, 5]},
        "hetlora": {"ranks": [2, 4], "min_rank": 1},
    }.get(name, {})
    task = {"adapter": {"rank": R, "alpha": 8.0}, "adapter_seed": 1}
    return STRATEGIES[name](
        tensors, task, fraction=0.5, seed=7, max_num_examples=100, train_head=True, **params
    )


def _round(strategy, server_round: int):
    """One round with replies that depend only on (round, client): returns the messages sent."""
    sent = list(
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), FakeGrid(NODES))
    )
    replies = []
    for msg in sent:
        node = msg.metadata.dst_node_id
        rng = np.random.default_rng(100 * server_round + node)
        tensors = {
            k: torch.from_numpy(rng.standard_normal(s.shape).astype(np.float32))
            for k, s in strategy.up_specs(node).items()
        }
        replies.append(reply(node, tensors, 5 + node))
    strategy.aggregate_train(server_round, replies)
    return sent


def _save_and_load(strategy, tmp_path, server_round: int) -> checkpoint.Checkpoint:
    tensors, meta = strategy.state_dict()
    ckpt = checkpoint.Checkpoint(
        server_round, tensors, meta, [{"round": 0}], {"wall_time_s": 1.0}, {}
    )
    checkpoint.save(tmp_path, ckpt)
    return checkpoint.load(tmp_path)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_restored_strategy_continues_exactly(name, tmp_path):
    """A strategy rebuilt from a checkpoint samples and aggregates as the original does."""
    original = _strategy(name)
    _round(original, 1)
    _round(original, 2)
    loaded = _save_and_load(original, tmp_path, 2)
    resumed = _strategy(name)
    resumed.load_state_dict(loaded.tensors, loaded.strategy)
    for server_round in (3, 4):
        sent_a, sent_b = _round(original, server_round), _round(resumed, server_round)
        assert [m.metadata.dst_node_id for m in sent_a] == [m.metadata.dst_node_id for m in sent_b]
        for key, value in original.global_adapter.items():
            assert torch.equal(value, resumed.global_adapter[key]), key
        assert len(original.base_stacks()) == len(resumed.base_stacks())
        if server_round == 3 and name in ("flora", "fed_sb"):
            # client state is not assumed after a resume: every node is resent what it needs
            for msg in sent_b:
                keys = list(msg.content.array_records["arrays"])
                prefix = "stack.1." if name == "flora" else "frozen."
                assert any(k.startswith(prefix) for k in keys), keys
                if name == "flora":
                    assert msg.content.config_records["config"]["stack-from"] == 0


def test_save_is_atomic_and_keeps_one_tensor_file(tmp_path):
    strategy = _strategy("fedavg")
    for server_round in (1, 2, 3):
        _round(strategy, server_round)
        _save_and_load(strategy, tmp_path, server_round)
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["state.json", "tensors-00003.pt"]
    loaded = checkpoint.load(tmp_path)
    assert loaded.server_round == 3 and loaded.rows == [{"round": 0}]
    assert all(
        torch.equal(loaded.tensors[f"global.{k}"], v) for k, v in strategy.global_adapter.items()
    )


def test_missing_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        checkpoint.load(tmp_path)
    cfg = compose_config(FAST_RUN)
    ckpt = checkpoint.Checkpoint(2, {}, {}, [], {}, checkpoint.plain_config(cfg))
    more = compose_config([*FAST_RUN, "federation.rounds=4", f"resume={tmp_path}"])
    checkpoint.check_resumable(ckpt, more)
    with pytest.raises(ConfigError, match="seed=1 but the checkpointed run has seed=0"):
        checkpoint.check_resumable(
            ckpt, compose_config([*FAST_RUN, "federation.rounds=4", "seed=1"])
        )
    with pytest.raises(ConfigError, match="federation.rounds above 2"):
        checkpoint.check_resumable(ckpt, compose_config([*FAST_RUN, "federation.rounds=2"]))


def test_cli_resume_of_a_folder_without_checkpoint_exits_2(tmp_path, capsys, data_dir):
    assert main(["simulate", *FAST_RUN, f"resume={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no checkpoint" in err[0]


def test_a_checkpoint_older_than_a_setting_still_resumes(tmp_path):
    cfg = compose_config(FAST_RUN)
    older = checkpoint.plain_config(cfg)
    del older["replies"]["max_median_multiple"]  # as written before that setting existed
    ckpt = checkpoint.Checkpoint(2, {}, {}, [], {}, older)
    checkpoint.check_resumable(ckpt, compose_config([*FAST_RUN, "federation.rounds=4"]))
    more_often = compose_config([*FAST_RUN, "federation.rounds=4", "eval.every=2"])
    checkpoint.check_resumable(ckpt, more_often)  # how often to evaluate may change on resume
