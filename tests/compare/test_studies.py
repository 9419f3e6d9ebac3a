import pytest

from fedpeft.compare.grid import expand, merge
from fedpeft.compare.studies import load_study, study_names
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError


def _runs(name, *extra):
    study = load_study(name)
    return expand(merge(study.overrides, list(extra)), study.strategy_overrides)


def test_packaged_studies():
    assert study_names() == [
        "client_dp_cross_device",
        "comm_efficiency",
        "dp_recipe",
        "dp_recipe_head",
        "fedsvd_dp_cpu",
        "fedsvd_dp_gpu",
        "fedsvd_dp_tuned",
        "fedsvd_dp_tuned_control",
        "fedsvd_table2_small",
        "hetero_rank",
        "label_skew",
        "methods11",
        "methods11_tuned",
        "methods13",
    ]


def test_label_skew_sweeps_the_rates_on_unseen_data():
    runs = _runs("label_skew")
    assert len(runs) == 2 * 2 * 3
    assert {r.values["dataset"] for r in runs} == {"sst2", "trec"}
    cfg = compose_config(list(runs[-1].overrides))
    assert (cfg.train.lr, cfg.train.head_lr) == (6e-3, 3e-3)
    assert cfg.federation.num_clients == 4 and cfg.federation.rounds == 3
    assert cfg.partition.alpha == 0.5 and cfg.server_opt.name == "none"
    assert cfg.model.pooling == "cls"


ELEVEN = ["fedavg", "ffa_lora", "flora", "fedsvd", "lora_fair", "fed_sb", "fedex_lora", "rolora",
          "flexlora", "hetlora", "fedsa_lora"]  # fmt: skip


def test_methods13_runs_every_registered_method_in_methods11s_federation():
    from fedpeft.strategies import STRATEGIES

    runs = _runs("methods13", "seed=0")
    assert sorted(r.values["strategy"] for r in runs) == sorted(STRATEGIES)
    eleven = {tuple(sorted(r.overrides)) for r in _runs("methods11", "seed=0")}
    assert eleven <= {tuple(sorted(r.overrides)) for r in runs}


def test_methods11_runs_the_first_eleven_methods_at_their_defaults():
    runs = _runs("methods11", "seed=0")
    assert sorted(r.values["strategy"] for r in runs) == sorted(ELEVEN)
    for run in runs:
        cfg = compose_config(list(run.overrides))
        shape = (cfg.model.name, cfg.dataset.name, cfg.federation.num_clients)
        assert shape == ("minilm", "sst2", 4)
        assert cfg.federation.rounds == 4 and cfg.dp.enabled is False
    hetlora = next(r for r in runs if r.values["strategy"] == "hetlora")
    assert compose_config(list(hetlora.overrides)).strategy.params.min_rank == 2


def test_fedsvd_table2_small_is_the_papers_setting():
    assert "seed=0,1,2" in load_study("fedsvd_table2_small").overrides
    runs = _runs("fedsvd_table2_small", "seed=0")
    assert len(runs) == 6 * 3
    assert {r.values["dp"] for r in runs} == {"off", "eps3", "eps6"}
    flora = next(r for r in runs if r.values["strategy"] == "flora")
    cfg = compose_config(list(flora.overrides))
    assert cfg.strategy.params.ranks is None and cfg.adapter.rank == 8
    assert cfg.federation.num_clients == 6 and cfg.federation.fraction == 0.5
    assert (cfg.model.name, cfg.dataset.name, cfg.partition.alpha) == ("minilm", "sst2", 0.5)


@pytest.mark.parametrize("name", ["dp_recipe", "dp_recipe_head"])
def test_dp_recipe_sweeps_the_quickstart_at_epsilon_3(name):
    runs = _runs(name)
    assert len(runs) == 2
    for run in runs:
        cfg = compose_config(list(run.overrides))
        assert (cfg.dataset.name, cfg.strategy.name, cfg.federation.num_clients) == (
            "spamassassin",
            "fedavg",
            4,
        )
        assert cfg.dp.target_epsilon == 3 and cfg.train.optimizer == "sgd"
        assert cfg.adapter.train_head is (name == "dp_recipe_head")
        assert cfg.model.pooling == "cls"  # the sweeps ran on the [CLS] pooler


@pytest.mark.parametrize(("name", "rounds"), [("fedsvd_dp_cpu", 3), ("fedsvd_dp_gpu", 100)])
def test_fedsvd_dp_studies_are_the_papers_federation(name, rounds):
    runs = _runs(name)
    assert len(runs) == 3 * 2 * 2 * 3
    assert {r.values["strategy"] for r in runs} == {"fedavg", "ffa_lora", "fedsvd"}
    assert {r.values["dp"] for r in runs} == {"eps3", "eps6"}
    for run in [next(r for r in runs if r.values["strategy"] == s) for s in ("fedavg", "ffa_lora")]:
        cfg = compose_config(list(run.overrides))
        assert cfg.adapter.alpha == 8 and cfg.adapter.rank == 8 and cfg.train.batch_size == 128
        assert cfg.federation.num_clients == 6 and cfg.federation.fraction == 0.5
        assert cfg.partition.alpha == 0.5 and cfg.federation.rounds == rounds
        assert cfg.adapter.train_head is False and cfg.train.optimizer == "sgd"
        assert cfg.model.pooling == ("cls" if name == "fedsvd_dp_gpu" else "mean")


def test_client_dp_cross_device_runs_the_composing_methods_at_both_levels():
    runs = _runs("client_dp_cross_device")
    assert len(runs) == 3 * 3 * 3
    assert {r.values["client_dp"] for r in runs} == {"off", "eps3", "eps8"}
    for run in runs[:9]:  # compose_config refuses a method that does not compose
        cfg = compose_config(list(run.overrides))
        assert cfg.federation.num_clients == 1000 and cfg.federation.fraction == 0.05
        if cfg.client_dp.enabled:
            assert cfg.client_dp.clipping == "adaptive"
            assert cfg.client_dp.target_epsilon in (3, 8)


def test_hetero_rank_gives_both_methods_the_same_ranks():
    runs = _runs("hetero_rank")
    assert sorted({r.values["strategy"] for r in runs}) == ["fedavg", "flora"]
    for run in runs:
        cfg = compose_config(list(run.overrides))
        assert list(cfg.strategy.params.ranks) == [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
        assert cfg.federation.num_clients == 10


def test_comm_efficiency_and_command_line_overrides_replace_the_studys():
    runs = _runs("comm_efficiency", "seed=0", "federation.rounds=5")
    assert len(runs) == 6 * 2
    assert all("seed" not in r.values and "federation.rounds=5" in r.overrides for r in runs)


def test_study_from_a_file_and_bad_studies(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("description: two seeds\noverrides: [model=tiny_bert, 'seed=0,1']\n")
    study = load_study(str(path))
    assert study.name == "mine" and len(expand(study.overrides)) == 2
    with pytest.raises(
        ConfigError,
        match="study=nope is unknown: choose one of client_dp_cross_device, comm_efficiency",
    ):
        load_study("nope")
    path.write_text("overrides: [seed=0]\ntargett: 0.9\n")
    with pytest.raises(ConfigError, match="unknown key 'targett'"):
        load_study(str(path))
    path.write_text("description: no overrides\n")
    with pytest.raises(ConfigError, match="needs a list `overrides:`"):
        load_study(str(path))


def test_methods11_tuned_is_methods11_with_every_method_tuned_first():
    tuned, plain = load_study("methods11_tuned"), load_study("methods11")
    assert tuned.tune == {
        "trials": 6,
        "validation_fraction": 0.2,
        "validation_examples": 872,
        "prune_after": 2,
        "seed": 0,
    }
    assert merge(tuned.overrides, ["seed=0,1,2"]) == plain.overrides
    assert tuned.strategy_overrides == plain.strategy_overrides


def test_a_study_with_a_bad_tune_is_refused(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("overrides: [strategy=fedavg]\ntune: 8\n")
    with pytest.raises(ConfigError, match="tune must be a mapping"):
        load_study(str(path))


def test_the_tuned_dp_ordering_and_its_control_share_one_federation():
    private, control = _runs("fedsvd_dp_tuned"), _runs("fedsvd_dp_tuned_control")
    assert len(private) == 3 * 2 * 3 and len(control) == 3 * 3
    for runs in (private, control):
        cfg = compose_config(list(runs[0].overrides))
        assert cfg.federation.rounds * cfg.federation.local_steps == 80
        assert (cfg.adapter.alpha, cfg.adapter.train_head, cfg.train.batch_size) == (8, False, 128)
        assert cfg.model.pooling == "mean" and cfg.partition.alpha == 0.5
    cfg = compose_config(list(private[-1].overrides))
    assert (cfg.train.optimizer, cfg.dp.max_grad_norm, cfg.dp.enabled) == ("sgd", 0.05, True)
    assert load_study("fedsvd_dp_tuned").tune["trials"] == 4
