"""Real federations through Flower's simulation engine (Ray) with tiny_bert on a slice of SST-2."""

import csv
import json

import pytest
import torch

from fedpeft import models
from fedpeft.cli import simulate
from fedpeft.config import compose_config
from fedpeft.strategies.base import LowRankStrategy
from tests.conftest import FAST_RUN, plain_peft_metrics

ADAPTER_KEY_ENDINGS = (".lora_A", ".lora_B")


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory, data_dir):
    """One FedAvg run whose every train message and reply is captured for inspection."""
    sent, received = [], []
    configure, aggregate = LowRankStrategy.configure_train, LowRankStrategy.aggregate_train

    def spy_configure(self, *args, **kwargs):
        messages = list(configure(self, *args, **kwargs))
        sent.extend(messages)
        return messages

    def spy_aggregate(self, server_round, replies):
        replies = list(replies)
        received.extend(replies)
        return aggregate(self, server_round, replies)

    run_dir = tmp_path_factory.mktemp("fedavg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LowRankStrategy, "configure_train", spy_configure)
        mp.setattr(LowRankStrategy, "aggregate_train", spy_aggregate)
        summary = simulate([*FAST_RUN, "strategy=fedavg", f"run_dir={run_dir}"])
    return summary, sent, received, run_dir


def test_run_folder_contract(audited_run):
    summary, _, _, run_dir = audited_run
    for key in (
        "strategy",
        "rounds_completed",
        "final_accuracy",
        "accuracy_by_round",
        "bytes_up",
        "bytes_down",
        "wall_time_s",
        "max_epsilon",
        "client_seconds",
        "stopped_early",
        "adapter_dir",
    ):
        assert key in summary
    assert summary["rounds_completed"] == 2 and len(summary["accuracy_by_round"]) == 3
    assert summary["max_epsilon"] is None and summary["stopped_early"] is None
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    history = (run_dir / "history.csv").read_text().splitlines()
    assert history[0].startswith("round,accuracy") and len(history) == 4
    assert (run_dir / "config.yaml").is_file() and (run_dir / "accuracy.png").stat().st_size > 1000


def test_client_seconds_are_summed_per_round_from_the_replies(audited_run):
    summary, _, received, run_dir = audited_run
    with (run_dir / "history.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["client_seconds"] == ""  # round 0 trains nothing
    replied = [float(m.content.metric_records["metrics"]["client-seconds"]) for m in received]
    assert len(replied) == 4 and all(s > 0 for s in replied)
    per_round = [float(r["client_seconds"]) for r in rows[1:]]
    assert per_round == pytest.approx([sum(replied[:2]), sum(replied[2:])], abs=1e-5)
    assert summary["client_seconds"] == pytest.approx(sum(replied), abs=1e-5)


def test_saved_adapter_loads_in_plain_peft_and_reproduces_accuracy(audited_run):
    summary, *_ = audited_run
    metrics = plain_peft_metrics([*FAST_RUN, "strategy=fedavg"], summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)


def test_message_audit_only_adapter_and_head_tensors_cross(audited_run):
    summary, sent, received, _ = audited_run
    assert len(sent) == 4 and len(received) == 4
    cfg = compose_config([*FAST_RUN])
    base = models.load_model(models.ModelSpec.from_config(cfg.model, 2))
    base_keys = set(base.state_dict())
    base_elements = sum(p.numel() for p in base.parameters())
    moved = 0
    for msg in [*sent, *received]:
        content = msg.content
        assert set(content.array_records) == {"arrays"}
        arrays = content.array_records["arrays"]
        for key, array in arrays.items():
            assert key.endswith(ADAPTER_KEY_ENDINGS) or key.startswith("head.classifier."), key
            assert key not in base_keys
            assert len(array.shape) == 2 and 8 in array.shape or key.startswith("head."), key
        elements = sum(int(torch.tensor(a.shape).prod()) for a in arrays.values())
        assert elements < 0.05 * base_elements
        moved += elements * 4
    for msg in sent:
        assert set(msg.content.config_records["config"].keys()) == {"server-round", "task"}
        assert len(msg.content.config_records["config"]["task"]) < 4096
    for msg in received:
        assert set(msg.content.metric_records) == {"metrics"}
    assert moved == summary["bytes_up"] + summary["bytes_down"]


@pytest.mark.parametrize(
    ("strategy", "up_per_client", "every"),
    [
        ("ffa_lora", lambda layers, r, h, head: layers * r * h + head, 1),  # B (+ head)
        ("fedsvd", lambda layers, r, h, head: layers * r * h, 1),  # B; head frozen
        ("lora_fair", lambda layers, r, h, head: layers * r * 2 * h + head, 2),  # A, B (+ head)
    ],
)
def test_each_method_runs_two_rounds(strategy, up_per_client, every, tmp_path, data_dir):
    summary = simulate(
        [*FAST_RUN, f"strategy={strategy}", f"eval.every={every}", f"run_dir={tmp_path}"]
    )
    assert summary["rounds_completed"] == 2 and len(summary["accuracy_by_round"]) == 3
    skipped = [r for r, acc in enumerate(summary["accuracy_by_round"]) if acc is None]
    assert skipped == ([1] if every == 2 else [])
    assert summary["final_accuracy"] == summary["accuracy_by_round"][-1] is not None
    rank, layers, hidden = 8, 2 * 2, 64  # r, query+value in 2 layers, tiny_bert width
    head = 2 * hidden + 2
    assert summary["bytes_up"] == 2 * 2 * up_per_client(layers, rank, hidden, head) * 4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_bytes_budget_stops_the_run_and_evaluates_its_last_round(tmp_path, data_dir, capsys):
    # about 67.6 kB move per round (two clients, both ways): round 1 meets 50 kB; eval.every=2
    # would have skipped its evaluation
    summary = simulate(
        [
            *FAST_RUN,
            "federation.rounds=3",
            "eval.every=2",
            "federation.stop_at.bytes=50000",
            f"run_dir={tmp_path}",
        ]
    )
    moved = summary["bytes_up"] + summary["bytes_down"]
    assert summary["stopped_early"] == {
        "rule": "bytes",
        "round": 1,
        "value": float(moved),
        "threshold": 50000.0,
    }
    assert summary["rounds_completed"] == 1 and moved >= 50000
    assert summary["accuracy_by_round"][1] is not None
    assert summary["final_accuracy"] == summary["accuracy_by_round"][1]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoint" / "tensors-00001.pt").is_file()
    printed = capsys.readouterr().err
    assert "stopping after round 1: federation.stop_at.bytes=50000 reached" in printed
    metrics = plain_peft_metrics([*FAST_RUN], summary["adapter_dir"])
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)


def test_an_accuracy_target_stops_the_run_after_the_round_that_meets_it(tmp_path, data_dir):
    summary = simulate(
        [
            *FAST_RUN,
            "federation.rounds=3",
            "federation.stop_at.accuracy=0.01",
            f"run_dir={tmp_path}",
        ]
    )
    accuracy = summary["accuracy_by_round"][1]
    assert summary["stopped_early"] == {
        "rule": "accuracy",
        "round": 1,
        "value": accuracy,
        "threshold": 0.01,
    }
    assert summary["rounds_completed"] == 1 and summary["final_accuracy"] == accuracy
