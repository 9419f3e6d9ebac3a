"""Noise calibration: the planned run ends at the target epsilon; planned rounds follow sampling."""

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
