import pytest

from fedpeft.compare.grid import config_digest, expand, merge
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from tests.conftest import FAST_RUN


def test_sweeps_expand_to_every_combination_with_stable_names():
    grid = ["strategy=fedavg,ffa_lora", "partition=dirichlet", "partition.alpha=0.1,1.0"]
    grid.append("seed=0,1")
    runs = expand([*FAST_RUN, *grid])
    assert len(runs) == 8
    assert runs[0].values == {"strategy": "fedavg", "partition.alpha": "0.1", "seed": "0"}
    assert runs[0].name.startswith("strategy-fedavg__partition.alpha-0.1__seed-0-")
    assert len({r.name for r in runs}) == 8
    again = expand([*FAST_RUN, *reversed(grid)])
    assert {r.name for r in again} == {r.name for r in runs}
    other = expand([*FAST_RUN, *grid, "federation.rounds=3"])
    assert not {r.name for r in other} & {r.name for r in runs}


def test_a_run_is_known_by_its_config(tmp_path):
    (one,) = expand([*FAST_RUN, "seed=0"])
    spelled = expand([*FAST_RUN, "dp=off", "seed=0,1"])
    assert spelled[0].digest == one.digest and spelled[0].name != one.name
    # a finished folder of the same config under another name is the run's folder
    (tmp_path / one.name).mkdir()
    (tmp_path / one.name / "summary.json").write_text("{}")
    assert spelled[0].folder(tmp_path) == tmp_path / one.name
    assert spelled[1].folder(tmp_path) == tmp_path / spelled[1].name


def test_hydra_sweep_forms_and_lists():
    runs = expand([*FAST_RUN, "seed=range(3)", "strategy.params.ranks=[2,4]"])
    assert [r.values["seed"] for r in runs] == ["0", "1", "2"]
    assert all("strategy.params.ranks=[2,4]" in r.overrides for r in runs)


def test_per_strategy_overrides_unless_the_grid_sets_the_key():
    extra = {"flora": ["strategy.params.ranks=null"]}
    runs = expand([*FAST_RUN, "strategy=fedavg,flora"], extra)
    assert "strategy.params.ranks=null" in runs[1].overrides
    assert "strategy.params.ranks=null" not in runs[0].overrides
    runs = expand([*FAST_RUN, "strategy=fedavg,flora", "strategy.params.ranks=[2,4]"], extra)
    assert all("strategy.params.ranks=null" not in r.overrides for r in runs)


def test_merge_keeps_the_last_value_of_a_key():
    assert merge(["seed=0,1", "dp=off"], ["seed=3"]) == ["seed=3", "dp=off"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["strategy=fedavg,nope"], "strategy=nope is unknown"),
        (["federation.rounds=2,0"], "federation.rounds=0 must be an integer >= 1"),
        (["run_dir=x"], "use out_dir= instead"),
        (["seed=interval(0,1)"], "sweep discrete values"),
        (["seed=0,,1"], "bad override"),
        (["seed=0,1,0"], "repeats a run"),
    ],
)
def test_bad_grids_fail_before_anything_runs(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        expand(overrides)


@pytest.mark.parametrize(
    ("overrides", "digest"),
    [
        ([], "dbf86aa8b7"),
        (["strategy=fedsvd", "dp=eps3", "seed=2"], "398f526374"),
        (
            ["strategy=ffa_lora", "federation.num_clients=1000", "federation.fraction=0.05"],
            "af35b629b2",
        ),
    ],
)
def test_keys_added_later_keep_finished_runs_digests(overrides, digest):
    """Digests from before client_dp, secagg and federation.pool_size existed (commit 006b43d)."""
    assert config_digest(compose_config(overrides)) == digest


def test_a_key_added_later_counts_once_it_changes_a_run():
    base = config_digest(compose_config([]))
    assert config_digest(compose_config(["client_dp=eps3", "client_dp.clipping=fixed"])) != base
    assert config_digest(compose_config(["secagg.num_shares=3"])) == base  # still disabled
    assert config_digest(compose_config(["federation.pool_size=2"])) != base
    # a pool is neutral where it repeats a node per client: fixed-size sampling, not FedSA-LoRA
    partial = ["federation.num_clients=10", "federation.fraction=0.3", "dataset=sst2"]
    with_pool = compose_config(partial)  # 3 of 10 sampled: a pool of 3 serves them
    assert with_pool.federation.pool_size is None
    assert config_digest(with_pool) == _digest_without_pool_key(partial)
    assert config_digest(compose_config([*partial, "strategy=fedsa_lora"])) != (
        _digest_without_pool_key([*partial, "strategy=fedsa_lora"])
    )
    private = [  # Poisson cohorts of mean 10 out of 100: a pool of 23, other draws
        "federation.num_clients=100",
        "federation.fraction=0.1",
        "dataset=sst2",
        "client_dp=eps8",
        "client_dp.clipping=fixed",
    ]
    assert config_digest(compose_config(private)) != _digest_without_pool_key(private)


def _digest_without_pool_key(overrides):
    """The digest a config had before federation.pool_size existed."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    from fedpeft.compare.grid import IGNORED, NEUTRAL

    plain = OmegaConf.to_container(compose_config(overrides), resolve=True)
    for key in IGNORED:
        plain.pop(key, None)
    del plain["federation"]["pool_size"]
    for key in ("client_dp", "secagg"):
        if NEUTRAL[key](plain[key], plain):
            del plain[key]
    return hashlib.sha1(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:10]
