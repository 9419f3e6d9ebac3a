"""The dp=eps* presets carry a training recipe into the clients' task; overrides win."""

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import compose_config
from fedpeft.federation import build_task, prepare
from fedpeft.runtime import model_runtime
from tests.conftest import FAST_RUN, in_process_rounds


@pytest.mark.parametrize("preset,epsilon", [("eps1", 1), ("eps3", 3), ("eps6", 6)])
@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora", "fedsvd"])
def test_each_preset_reaches_the_task(preset, epsilon, strategy, data_dir):
    task = build_task(compose_config([*FAST_RUN, f"dp={preset}", f"strategy={strategy}"]), 2)
    assert task["dp"]["enabled"] and task["dp"]["target_epsilon"] == epsilon
    assert task["dp"]["max_grad_norm"] == 1.0 and task["dp"]["max_physical_batch_size"] == 64
    train = task["train"]
    assert (train["optimizer"], train["lr"], train["batch_size"]) == ("sgd", 0.05, 128)
    assert train["head_lr"] == 2.0 and train["momentum"] == 0.0
    assert task["model"]["pooling"] == "mean"
    # The head is trained on the mean-pooled embedding; FedSVD keeps the paper's frozen head.
    assert task["adapter"]["train_head"] is (strategy != "fedsvd")
    # Every method takes the preset's alpha = rank, FFA-LoRA's own default included.
    assert task["adapter"]["alpha"] == 8


def test_the_preset_sets_its_own_local_steps_and_the_command_line_still_wins():
    assert compose_config(["dp=eps3"]).federation.local_steps == 10
    assert compose_config(["dp=eps3", "federation.local_steps=4"]).federation.local_steps == 4
    assert compose_config([]).federation.local_steps == 30


def test_command_line_overrides_the_preset(data_dir):
    cfg = compose_config(
        [*FAST_RUN, "dp=eps3", "adapter.train_head=false", "train.optimizer=adamw",
         "strategy=ffa_lora", "train.lr=0.2", "model.pooling=cls"]
    )  # fmt: skip
    task = build_task(cfg, 2)
    assert task["adapter"]["train_head"] is False and task["model"]["pooling"] == "cls"
    assert task["train"]["optimizer"] == "adamw" and task["train"]["lr"] == 0.2


def test_without_dp_nothing_changes(data_dir):
    task = build_task(compose_config(FAST_RUN), 2)
    assert not task["dp"]["enabled"]
    assert (task["train"]["optimizer"], task["train"]["batch_size"]) == ("adamw", 16)
    assert task["adapter"]["train_head"] is True and task["adapter"]["alpha"] == 16
    assert task["model"]["pooling"] == "cls"
    custom = build_task(compose_config([*FAST_RUN, "dp=custom", "dp.target_epsilon=2"]), 2)
    assert custom["train"]["optimizer"] == "adamw" and custom["dp"]["max_grad_norm"] == 1.0


def test_a_private_run_with_the_head_frozen_keeps_it_seeded_and_trains_the_adapter(
    tmp_path, data_dir
):
    overrides = [*FAST_RUN, "dp=eps3", "adapter.train_head=false"]
    fed = prepare(compose_config(overrides))
    in_process_rounds(fed, 2, tmp_path, simulated=True)
    assert 2.9 <= fed.strategy.privacy.max_epsilon() <= 3.0
    fed.save_adapter(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    runtime = model_runtime(build_task(compose_config(overrides), 2))
    runtime.reset({})
    # peft saves the head's live copy (modules_to_save.default) under the head's own name.
    initial = {
        n.replace("modules_to_save.default.", ""): p.detach()
        for n, p in runtime.model.named_parameters()
        if "classifier.modules_to_save.default." in n
    }
    heads = {n: t for n, t in saved.items() if "classifier" in n}
    assert heads and set(heads) == set(initial)
    assert all(torch.equal(initial[n].to(t.dtype), t) for n, t in heads.items())
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)
