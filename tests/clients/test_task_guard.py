"""The node's own check of a server's task: what it reads is its own, sizes stay within its caps."""

from __future__ import annotations

import copy

import pytest

from fedpeft.clients.task_guard import (
    LIMITS,
    TaskRefused,
    check_round,
    check_task,
    node_limits,
    parse_task,
    pin_model,
)
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import build_task
from tests.conftest import FAST_RUN


@pytest.fixture(scope="module")
def task():
    return build_task(compose_config(FAST_RUN), 2, ["negative", "positive"])


def _with(task: dict, section: str, key: str, value) -> dict:
    out = copy.deepcopy(task)
    out[section][key] = value
    return out


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "name_or_path", "/etc/secrets/model"),
        ("model", "name_or_path", "attacker/model-with-remote-code"),
        ("model", "revision", "refs/pr/1"),
        ("dataset", "path", "/home/alice/private.csv"),
    ],
)
def test_a_deployed_node_reads_no_file_or_hub_id_the_server_names(task, section, key, value):
    hostile = _with(task, section, key, value)
    with pytest.raises(TaskRefused, match=f"the task's {section}.{key}=.* names a file or hub id"):
        check_task(hostile, {}, deployed=True)
    check_task(hostile, {"allow-task-paths": True}, deployed=True)  # the operator's choice
    check_task(hostile, {}, deployed=False)  # a simulation reads the run's own config


def test_the_nodes_model_path_replaces_the_servers(task):
    hostile = _with(task, "model", "name_or_path", "/etc/passwd")
    node = {"model-path": "/models/mine"}
    check_task(hostile, node, deployed=True)  # pinned: the server's value is not read
    pinned = pin_model(hostile, node)
    assert pinned["model"]["name_or_path"] == "/models/mine" and pinned["model"]["revision"] is None
    assert pin_model(task, {}) is task


@pytest.mark.parametrize(
    ("section", "key", "value", "cap"),
    [
        ("train", "batch_size", 10**7, "max-batch-size"),
        ("train", "max_length", 10**6, "max-length"),
        ("adapter", "rank", 100_000, "max-rank"),
        ("train", "local_steps", 10**9, "max-local-steps"),
    ],
)
def test_sizes_beyond_the_nodes_caps_are_refused_naming_the_cap(task, section, key, value, cap):
    with pytest.raises(TaskRefused, match=f"{section}.{key}={value} must be .*node config {cap}"):
        check_task(_with(task, section, key, value), {}, deployed=True)
    check_task(_with(task, section, key, value), {cap: value}, deployed=True)  # raised by the node


def test_round_config_sizes_are_capped_too():
    check_round({"adapter-rank": 8, "stack-to": 0}, {})
    with pytest.raises(TaskRefused, match="adapter-rank=4096 must be an integer in \\[1, 256\\]"):
        check_round({"adapter-rank": 4096}, {})
    with pytest.raises(TaskRefused, match="stack-to=5000 .*max-stack-depth"):
        check_round({"stack-to": 5000}, {})
    with pytest.raises(TaskRefused, match="adapter-alpha=nan"):
        check_round({"adapter-alpha": float("nan")}, {})


def test_bad_caps_in_the_node_config_are_a_clear_error():
    assert set(node_limits({})) == set(LIMITS)
    with pytest.raises(ConfigError, match="node config max-rank=0 must be an integer >= 1"):
        node_limits({"max-rank": 0})
    with pytest.raises(ConfigError, match="allow-task-paths='yes' must be true or false"):
        check_task(build_task(compose_config(FAST_RUN), 2), {"allow-task-paths": "yes"},
                   deployed=True)  # fmt: skip


def test_a_task_without_its_sections_is_refused(task):
    for section in ("train", "adapter"):
        broken = copy.deepcopy(task)
        broken[section] = "x"
        with pytest.raises(TaskRefused, match=f"the task's {section} must be an object"):
            check_task(broken, {}, deployed=False)
    assert parse_task('{"a": 1}') == {"a": 1}
