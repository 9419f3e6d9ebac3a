"""Client-level DP's settings, calibration and accountant (fedpeft/privacy/client_level.py)."""

import math

import dp_accounting
import pytest
from dp_accounting import rdp

from fedpeft.errors import ConfigError
from fedpeft.privacy.client_level import (
    ClientDPSettings,
    ClientNoise,
    adaptive_clip_step,
)

FULL = {
    "enabled": True,
    "target_epsilon": 3.0,
    "delta": None,
    "noise_multiplier": None,
    "clipping": "adaptive",
    "clip_norm": 0.1,
    "target_quantile": 0.5,
    "clip_lr": 0.2,
    "count_stddev": None,
    "accountant": "rdp",
    "reproducible": False,
}


def settings(**changes) -> ClientDPSettings:
    return ClientDPSettings.parse({**FULL, **changes})


def test_disabled_is_the_default_and_ignores_nothing_else():
    assert ClientDPSettings.parse({"enabled": False}) == ClientDPSettings()
    with pytest.raises(ConfigError, match="unknown key"):
        ClientDPSettings.parse({"enabled": False, "target_epsilonn": 3})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("target_epsilon", math.nan, "target_epsilon=nan"),
        ("target_epsilon", math.inf, "target_epsilon=inf"),
        ("target_epsilon", 0, "target_epsilon=0"),
        ("target_epsilon", True, "target_epsilon=True"),
        ("delta", 1.0, "delta=1.0"),
        ("noise_multiplier", 0.0, "noise_multiplier=0.0"),
        ("clipping", "flat", "clipping=flat"),
        ("clip_norm", -1.0, "clip_norm=-1.0"),
        ("clip_norm", "0.1", "clip_norm=0.1"),
        ("target_quantile", 1.5, "target_quantile=1.5"),
        ("clip_lr", math.inf, "clip_lr=inf"),
        ("count_stddev", 0.0, "count_stddev=0.0"),
        ("accountant", "gdp", "accountant=gdp"),
        ("reproducible", 1, "reproducible=1"),
    ],
)
def test_out_of_range_values_are_refused_by_name(key, value, fragment):
    with pytest.raises(ConfigError, match=f"client_dp.{fragment}"):
        settings(**{key: value})


def test_an_enabled_group_states_every_setting():
    partial = dict(FULL)
    del partial["clip_norm"]
    with pytest.raises(ConfigError, match="no clip_norm"):
        ClientDPSettings.parse(partial)
    with pytest.raises(ConfigError, match="must be a mapping"):
        ClientDPSettings.parse([("enabled", True)])


@pytest.mark.parametrize(
    ("epsilon", "population", "rate", "rounds"),
    [(1.0, 1000, 0.01, 100), (3.0, 1000, 0.03, 20), (8.0, 500, 0.1, 50), (3.0, 10**6, 1e-4, 500)],
)
def test_calibration_spends_the_target_over_the_planned_rounds(epsilon, population, rate, rounds):
    noise = ClientNoise.calibrate(
        settings(target_epsilon=epsilon, clipping="fixed"),
        population=population,
        sample_rate=rate,
        rounds=rounds,
    )
    assert noise.delta <= min(1e-5, 1 / population)
    assert noise.expected_cohort == pytest.approx(rate * population)
    spent = noise.epsilon(rounds)
    assert 0.97 * epsilon <= spent <= epsilon * 1.0001
    assert noise.epsilon(rounds // 2) < spent and noise.epsilon(0) == 0.0


@pytest.mark.parametrize(
    ("z", "q", "rounds", "delta"),
    [
        (0.8, 0.03, 20, 1e-5),
        (1.2, 0.01, 1000, 1e-6),
        (3.0, 1.0, 10, 1e-5),
        (0.6, 0.001, 5000, 1e-7),
    ],
)
def test_the_accountant_agrees_with_googles_dp_accounting(z, q, rounds, delta):
    noise = ClientNoise(z, z, 0.0, q, int(1 / delta) * 10, delta, "rdp")
    reference = rdp.RdpAccountant()
    reference.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    assert noise.epsilon(rounds) == pytest.approx(reference.get_epsilon(delta), rel=0.02)


def test_the_prv_accountant_is_within_the_rdp_bound():
    rdp_noise = ClientNoise(1.0, 1.0, 0.0, 0.05, 10_000, 1e-5, "rdp")
    prv_noise = ClientNoise(1.0, 1.0, 0.0, 0.05, 10_000, 1e-5, "prv")
    assert 0.5 * rdp_noise.epsilon(200) < prv_noise.epsilon(200) <= rdp_noise.epsilon(200)


def test_adaptive_clipping_splits_the_noise_between_the_sum_and_the_count():
    noise = ClientNoise.calibrate(settings(), population=1000, sample_rate=0.05, rounds=100)
    z, z_update, count = noise.noise_multiplier, noise.update_multiplier, noise.count_stddev
    assert count == pytest.approx(50 / 20)
    assert z_update > z
    assert z_update**-2 + (2 * count) ** -2 == pytest.approx(z**-2, rel=1e-9)


def test_adaptive_clipping_with_too_small_a_cohort_is_refused_with_the_fixes():
    with pytest.raises(ConfigError, match="count_stddev above .*clipping=fixed"):
        ClientNoise.calibrate(settings(), population=4, sample_rate=1.0, rounds=3)
    explicit = ClientNoise.calibrate(
        settings(count_stddev=5.0), population=4, sample_rate=1.0, rounds=3
    )
    assert explicit.count_stddev == 5.0


def test_a_delta_not_below_one_over_the_population_is_refused():
    with pytest.raises(ConfigError, match="not below 1/N"):
        ClientNoise.calibrate(settings(delta=0.01), population=100, sample_rate=0.1, rounds=10)


def test_a_fixed_noise_multiplier_is_used_as_given():
    noise = ClientNoise.calibrate(
        settings(noise_multiplier=1.5, clipping="fixed"),
        population=100,
        sample_rate=0.1,
        rounds=10,
    )
    assert noise.noise_multiplier == noise.update_multiplier == 1.5 and noise.count_stddev == 0


def test_the_geometric_step_moves_the_bound_towards_the_target_quantile():
    # Too many updates unclipped (bound above the quantile): the bound shrinks, and vice versa.
    assert adaptive_clip_step(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.08))
    assert adaptive_clip_step(1.0, 0.1, 0.5, 0.2) == pytest.approx(math.exp(0.08))
    assert adaptive_clip_step(2.0, 0.5, 0.5, 0.2) == 2.0
