"""The round task: one typed object, the same on the server and the node, refusing bad values."""

import copy
import json

import pytest

from fedpeft.clients.task_guard import TaskRefused, check_task
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import build_task
from fedpeft.round_task import DriftSettings, RoundTask
from fedpeft.training import TrainSettings
from tests.conftest import FAST_RUN


@pytest.fixture(scope="module")
def task(data_dir) -> dict:
    return build_task(compose_config([*FAST_RUN, "dp=eps3", "client_opt.proximal_mu=0.1"]), 2)


def test_the_server_sends_the_canonical_form_a_node_rebuilds(task):
    typed = RoundTask.from_dict(task)
    assert typed.to_dict() == task and RoundTask.from_json(typed.to_json()) == typed
    assert typed.train.lr == task["train"]["lr"] and isinstance(typed.train, TrainSettings)
    assert typed.dp.enabled and typed.client_opt == DriftSettings(0.1, False)
    assert check_task(json.loads(json.dumps(task)), {}, deployed=False) == typed
    node = typed.with_adapter(4, 8.0)
    assert (node.adapter.rank, node.adapter.alpha) == (4, 8.0) and typed.adapter.rank == 8


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ((), ("extra", 1), "unknown key\\(s\\) extra"),
        (("train",), ("learning_rate", 1e-3), "train has unknown key\\(s\\) learning_rate"),
        (("train", "lr"), -1.0, "train.lr=-1.0 must be a finite number >= 0"),
        (("train", "batch_size"), True, "train.batch_size=True must be an integer"),
        (("train", "optimizer"), "lion", "train.optimizer='lion' must be one of adamw, sgd"),
        (("train", "precision"), "fp8", "train.precision='fp8' must be one of"),
        (("adapter", "kind"), "dora", "adapter kind 'dora' is unknown"),
        (("adapter", "dropout"), 1.5, "adapter.dropout=1.5 must be a number in"),
        (("client_opt", "proximal_mu"), -0.5, "client_opt.proximal_mu=-0.5 must be"),
        (("client_opt", "scaffold"), "yes", "client_opt.scaffold='yes' must be true or false"),
        (("seed",), -3, "task.seed=-3 must be an integer >= 0"),
        (("task",), "regression", "task.task='regression' must be one of"),
        (("label_names",), [1, 2], "label_names=\\[1, 2\\] must be a list of strings"),
        (("model", "name"), "gpt5", "model='gpt5' is unknown"),
        (("a_from_seed",), 1, "a_from_seed=1 must be true or false"),
        (("canaries",), {"count": 10, "seed": 0, "kind": "dirac"}, "canaries.kind='dirac'"),
        (("canaries",), {"count": 0, "seed": 0}, "canaries.count=0 must be in \\[1, 100000\\]"),
        (("canaries",), {"count": 5, "seed": 0, "owner": 1}, "canaries has unknown key"),
    ],
)
def test_a_bad_value_is_refused_naming_it_on_both_sides(task, path, value, message):
    bad = copy.deepcopy(task)
    if not path:
        bad[value[0]] = value[1]
    elif path == ("train",):
        bad["train"][value[0]] = value[1]
    elif len(path) == 1:
        bad[path[0]] = value
    else:
        bad[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=message):
        RoundTask.from_dict(bad)
    with pytest.raises(TaskRefused, match=message):
        check_task(bad, {}, deployed=False)


def test_every_section_is_required(task):
    for key in RoundTask.REQUIRED:
        partial = {k: v for k, v in task.items() if k != key}
        with pytest.raises(ConfigError, match=f"has no {key}"):
            RoundTask.from_dict(partial)
    train = {k: v for k, v in task["train"].items() if k != "max_grad_norm"}
    with pytest.raises(ConfigError, match="train has no max_grad_norm"):
        RoundTask.from_dict({**task, "train": train})
    neither = {**task["train"], "local_steps": None, "local_epochs": None}
    with pytest.raises(ConfigError, match="local_steps=None must be set when local_epochs"):
        RoundTask.from_dict({**task, "train": neither})


def test_a_deployed_node_refuses_a_task_with_canaries(task):
    audited = {**task, "canaries": {"count": 10, "seed": 0, "length": 16, "kind": "gradient"}}
    assert RoundTask.from_dict(audited).canaries.kind == "gradient"
    with pytest.raises(TaskRefused, match="trains on its own data only"):
        check_task(audited, {}, deployed=True)
