"""The `task` key: derived from the dataset group, with causal defaults from the model group."""

import pytest

from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import build_task

GSM8K = ["model=tiny_llama", "dataset=gsm8k", "partition=iid"]


def test_gsm8k_makes_a_causal_task_with_q_v_adapters_and_no_head():
    cfg = compose_config(GSM8K)
    assert cfg.task == "causal_lm" and cfg.eval.max_new_tokens == 256
    assert list(cfg.adapter.target_modules) == ["q_proj", "v_proj"]
    assert cfg.adapter.train_head is False
    task = build_task(cfg, 0)
    assert task["task"] == task["model"]["task"] == "causal_lm"
    assert task["adapter"]["target_modules"] == ["q_proj", "v_proj"]


def test_classification_defaults_are_unchanged():
    cfg = compose_config([])
    assert cfg.task == "classification" and list(cfg.adapter.target_modules) == ["query", "value"]
    assert cfg.adapter.train_head is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset=gsm8k", "partition=iid"], "model=minilm is a classification model"),
        (["model=tiny_llama"], "model=tiny_llama is a causal_lm model"),
        ([*GSM8K[:2], "partition=dirichlet"], "partition=dirichlet splits"),
        ([*GSM8K, "task=classification"], "pick a text/label dataset"),
        ([*GSM8K, "eval.max_new_tokens=0"], "eval.max_new_tokens=0 must be an integer >= 1"),
        (["model=hf_causal", "model.name_or_path=x"], "model.task=causal_lm does not match"),
    ],
)
def test_mismatched_task_model_or_data_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_prompt_response_data_defaults_to_an_iid_partition():
    assert compose_config(["model=tiny_llama", "dataset=gsm8k"]).partition.name == "iid"
    cfg = compose_config(["model=tiny_llama", "dataset=jsonl", "dataset.path=x"])
    assert cfg.partition.name == "iid"
    assert compose_config([]).partition.name == "dirichlet"
