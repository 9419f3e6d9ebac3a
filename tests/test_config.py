from fedpeft.config import compose_config, group_options


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
    assert cfg.strategy.kind == "frozen_a" and cfg.federation.rounds == 7
    assert cfg.partition.alpha == 0.1
