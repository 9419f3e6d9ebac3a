"""Noise calibration: the planned run ends at the target epsilon; planned rounds follow sampling."""

import re

import pytest
from opacus.accountants import create_accountant

from fedpeft.privacy import calibrate_noise, planned_rounds


@pytest.mark.parametrize(
    ("rounds", "clients", "fraction", "minimum", "expected"),
    [(3, 4, 1.0, 1, 3), (100, 6, 0.5, 1, 50), (10, 1000, 0.01, 1, 1), (10, 6, 0.1, 3, 5)],
)
def test_planned_rounds_follow_the_samplers_expected_participation(
    rounds, clients, fraction, minimum, expected
):
    assert planned_rounds(rounds, clients, fraction, minimum) == expected


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
@pytest.mark.parametrize(("target", "rate", "steps"), [(3.0, 16 / 3368, 90), (1.0, 0.08, 60)])
def test_calibrated_sigma_spends_the_target_over_the_planned_steps(mechanism, target, rate, steps):
    sigma = calibrate_noise(target, 1e-5, rate, steps, mechanism)
    accountant = create_accountant(mechanism)
    accountant.history = [(sigma, rate, steps)]
    spent = accountant.get_epsilon(delta=1e-5)
    assert target - 0.01 <= spent <= target
    accountant.history = [(sigma * 0.97, rate, steps)]  # a little less noise overspends
    assert accountant.get_epsilon(delta=1e-5) > target


def test_a_client_too_small_for_its_budget_is_warned_of_with_the_numbers():
    from fedpeft.privacy import small_client_warning

    # The numbers: n = 2,865 needs sigma ~1.6 at B = 128, T = 500, n = 22,368 ~0.65.
    args = (3.0, 1e-5, "rdp", 50, 128, lambda n: 10)
    message = small_client_warning([2865, 22368, 22368, 20000], *args)
    assert message is not None and "n_k=2865" in message and "n_k=22368" in message
    low, typical = map(float, re.findall(r"multiplier ([\d.]+) .* against ([\d.]+)", message)[0])
    assert low >= 1.5 * typical
    assert "merge small clients, exclude them, or raise dp.target_epsilon" in message
    assert small_client_warning([20000, 22368, 22368, 21000], *args) is None  # balanced: quiet
    assert small_client_warning([500], *args) is None


def test_prepare_warns_of_a_small_simulated_client(caplog, data_dir):
    from fedpeft.config import compose_config
    from fedpeft.federation import prepare

    run = [
        "model=tiny_bert", "dataset=sst2", "dataset.max_train_examples=2000",
        "dataset.max_test_examples=50", "federation.num_clients=4", "partition=dirichlet",
        "partition.alpha=0.1", "dp=eps3", "dp.accountant=rdp", "federation.local_steps=2",
    ]  # fmt: skip
    with caplog.at_level("WARNING", logger="fedpeft.federation"):
        fed = prepare(compose_config(run))
    sizes = sorted(fed.partition_sizes)
    warned = [r.getMessage() for r in caplog.records if "smallest client" in r.getMessage()]
    assert warned and f"n_k={sizes[0]}" in warned[0], (sizes, warned)
