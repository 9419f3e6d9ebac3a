"""The dp=eps* presets carry a training recipe into the clients' task; overrides win."""

import pytest

from fedpeft.config import compose_config
from fedpeft.federation import build_task
from tests.conftest import FAST_RUN


@pytest.mark.parametrize("preset,epsilon", [("eps1", 1), ("eps3", 3), ("eps6", 6)])
@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora", "fedsvd"])
def test_each_preset_reaches_the_task(preset, epsilon, strategy, data_dir):
    task = build_task(compose_config([*FAST_RUN, f"dp={preset}", f"strategy={strategy}"]), 2)
    assert task["dp"]["enabled"] and task["dp"]["target_epsilon"] == epsilon
    assert task["dp"]["max_grad_norm"] == 2.0 and task["dp"]["max_physical_batch_size"] == 64
    train = task["train"]
    assert (train["optimizer"], train["lr"], train["batch_size"]) == ("sgd", 0.5, 128)
    assert train["head_lr"] is None and train["momentum"] == 0.0
    assert task["adapter"]["train_head"] is False
    # FFA-LoRA keeps its own alpha; the others take the preset's alpha = rank.
    assert task["adapter"]["alpha"] == (16.0 if strategy == "ffa_lora" else 8)


def test_command_line_overrides_the_preset(data_dir):
    cfg = compose_config(
        [*FAST_RUN, "dp=eps3", "adapter.train_head=true", "train.optimizer=adamw",
         "train.lr=1e-3", "strategy=ffa_lora", "strategy.lr=0.2"]
    )  # fmt: skip
    task = build_task(cfg, 2)
    assert task["adapter"]["train_head"] is True
    assert task["train"]["optimizer"] == "adamw" and task["train"]["lr"] == 0.2


def test_without_dp_nothing_changes(data_dir):
    task = build_task(compose_config(FAST_RUN), 2)
    assert not task["dp"]["enabled"]
    assert (task["train"]["optimizer"], task["train"]["batch_size"]) == ("adamw", 16)
    assert task["adapter"]["train_head"] is True and task["adapter"]["alpha"] == 16
    custom = build_task(compose_config([*FAST_RUN, "dp=custom", "dp.target_epsilon=2"]), 2)
    assert custom["train"]["optimizer"] == "adamw" and custom["dp"]["max_grad_norm"] == 1.0
