import re

import pytest

from fedpeft.config import compose_config, group_options
from fedpeft.errors import ConfigError


def test_defaults_are_the_quickstart_federation():
    cfg = compose_config([])
    assert cfg.strategy.name == "fedavg" and cfg.model.name == "minilm"
    assert cfg.dataset.name == "spamassassin"
    assert cfg.partition.name == "dirichlet" and cfg.partition.alpha == 0.5
    assert cfg.federation.num_clients == 4 and cfg.federation.rounds == 3
    assert cfg.adapter.rank == 8 and list(cfg.adapter.target_modules) == ["query", "value"]
    assert cfg.adapter.train_head and cfg.dp.enabled is False


def test_every_group_has_its_documented_options():
    assert {"fedavg", "ffa_lora", "fedsvd", "lora_fair"} <= set(group_options("strategy"))
    assert {"minilm", "tiny_bert", "hf"} <= set(group_options("model"))
    assert {"spamassassin", "sst2", "banking77", "trec", "files", "hf"} <= set(
        group_options("dataset")
    )
    assert {"iid", "dirichlet", "pathological"} <= set(group_options("partition"))


def test_overrides_apply():
    cfg = compose_config(["strategy=ffa_lora", "federation.rounds=7", "partition.alpha=0.1"])
    assert cfg.strategy.name == "ffa_lora" and cfg.federation.rounds == 7
    assert cfg.partition.alpha == 0.1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("faults.crash_prob=1.5", "faults.crash_prob=1.5 must be a probability"),
        ("faults.slow_prob=-0.1", "faults.slow_prob=-0.1 must be a probability"),
        ("faults.slow_s=-1", "faults.slow_s=-1 must be >= 0"),
        ("faults.seed=x", "faults.seed=x must be an integer"),
        ("replies.norm_bound=0", "replies.norm_bound=0 must be positive"),
        ("replies.max_num_examples=0", "replies.max_num_examples=0 must be an integer"),
        ("replies.max_median_multiple=0.5", "replies.max_median_multiple=0.5 must be a number"),
        ("federation.round_timeout=0", "federation.round_timeout=0 must be a positive number"),
        ("resume=/no/such/run", "resume=/no/such/run is not a run folder"),
        ("eval.every=0", "eval.every=0 must be an integer >= 1"),
    ],
)
def test_robustness_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config([override])


def test_fault_probabilities_may_not_exceed_one_together():
    with pytest.raises(ConfigError, match="exceeds 1"):
        compose_config(["faults.crash_prob=0.6", "faults.slow_prob=0.5"])
    cfg = compose_config(["faults.crash_prob=0.3", "replies.norm_bound=100"])
    assert cfg.faults.crash_prob == 0.3 and cfg.replies.norm_bound == 100 and cfg.resume is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.pool_size=0"], "federation.pool_size must be a positive integer or null"),
        (["federation.pool_size=2.5"], "federation.pool_size must be a positive integer or null"),
        (["partition=sampled", "partition.mean_examples=0"], "partition.mean_examples must be"),
        (["partition=sampled", "+partition.alpha=0.5"], "partition=sampled has no key(s) alpha"),
        (
            [
                "client_dp=eps3",
                "client_dp.clipping=fixed",
                "secagg.enabled=true",
                "federation.num_clients=100",
                "federation.fraction=0.1",
                "dataset=sst2",
            ],
            "secagg.enabled=true with a pool of",
        ),
    ],
)
def test_pool_and_sampled_partition_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(overrides)


def test_secure_aggregation_runs_with_a_node_per_client():
    cfg = compose_config(
        [
            "client_dp=eps3",
            "client_dp.clipping=fixed",
            "secagg.enabled=true",
            "federation.num_clients=100",
            "federation.fraction=0.1",
            "federation.pool_size=100",
        ]
    )
    assert cfg.federation.pool_size == 100
