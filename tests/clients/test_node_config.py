"""Per-node device and dtype: the node config overrides the server's task for that node only."""

import pytest
import torch

from fedpeft import adapters, training
from fedpeft.clients.client_data import client_examples
from fedpeft.clients.node_config import node_task
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import build_task
from fedpeft.runtime import adapter_spec, model_runtime
from tests.conftest import FAST_RUN


@pytest.fixture(scope="module")
def task():
    return build_task(compose_config([*FAST_RUN, "device=auto"]), 2, ["negative", "positive"])


def test_node_overrides_device_and_dtype_without_touching_the_task(task):
    before = repr(task)
    mine = node_task(task, {"device": "cpu", "dtype": "bfloat16"})
    assert mine["device"] == "cpu" and mine["model"]["dtype"] == "bfloat16"
    assert repr(task) == before and task["model"]["dtype"] == "float32"
    assert node_task(task, {"partition-id": 0}) == task


def test_bad_node_settings_name_the_fix(task):
    with pytest.raises(ConfigError, match="dtype='half' is unknown: choose one of float32"):
        node_task(task, {"dtype": "half"})
    with pytest.raises(ConfigError, match='float16 is not supported.*CPU.*dtype="bfloat16"'):
        node_task(task, {"device": "cpu", "dtype": "float16"})
    with pytest.raises(ConfigError, match="device='tpu9' is not a device"):
        node_task(task, {"device": "tpu9"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available: use device=cpu"):
            node_task(task, {"device": "cuda"})


def test_bfloat16_node_trains_and_replies_float32(task, data_dir):
    mine = node_task(task, {"device": "cpu", "dtype": "bfloat16"})
    runtime = model_runtime(mine)
    assert runtime.model.base_model.model.bert.embeddings.word_embeddings.weight.dtype == (
        torch.bfloat16
    )
    examples = client_examples(mine, {"partition-id": 0, "num-partitions": 2})[:32]
    runtime.reset({})
    keys = adapters.select_keys(
        adapters.adapter_tensors(runtime.model),
        adapter_spec(mine).trained_factors,
        adapter_spec(mine).train_head,
    )
    before = adapters.read_adapter(runtime.model, keys)
    hp = mine["train"]
    optimizer = training.make_optimizer(
        training.param_groups(runtime.model, float(hp["lr"]), hp.get("head_lr")),
        hp["optimizer"],
        float(hp["lr"]),
    )
    result = training.train_steps(
        runtime.model,
        examples,
        optimizer,
        steps=2,
        batch_size=8,
        pad_token_id=runtime.tokenizer.pad_token_id,
        device=runtime.device,
        seed=0,
    )
    after = adapters.read_adapter(runtime.model, keys)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.loss))
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in keys)
