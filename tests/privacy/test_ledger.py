"""The privacy ledger: calibration once, history across rounds in its file, the budget check."""

import pytest
from opacus.accountants import create_accountant

from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.privacy import BudgetExhausted, DPSettings, LedgerFile, PrivacyLedger
from fedpeft.privacy.ledger import spent_epsilon

SETTINGS = DPSettings(enabled=True, target_epsilon=3.0, planned_rounds=3)


@pytest.fixture
def state(tmp_path) -> LedgerFile:
    return LedgerFile(tmp_path, run_id=7, data=0)


def test_first_open_calibrates_for_the_planned_steps(state):
    ledger = PrivacyLedger.open(state, SETTINGS, 1000, 16, steps_per_round=20)
    assert ledger.sample_rate == 16 / 1000 and ledger.delta == 1e-5 and ledger.steps == 0
    accountant = create_accountant("prv")
    accountant.history = [(ledger.noise_multiplier, ledger.sample_rate, 60)]
    assert 2.99 <= accountant.get_epsilon(delta=1e-5) <= 3.0
    assert ledger.epsilon(60) == pytest.approx(accountant.get_epsilon(delta=1e-5))


def test_ledger_survives_in_its_file_and_keeps_its_calibration(state, tmp_path):
    ledger = PrivacyLedger.open(state, SETTINGS, 1000, 16, steps_per_round=20)
    accountant = ledger.accountant()
    for _ in range(20):
        accountant.step(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate)
    ledger.record(accountant)
    ledger.save(state)
    # A later round with other settings in the task still uses the first calibration.
    reopened = LedgerFile(tmp_path, run_id=7, data=0)  # as a restarted process would
    again = PrivacyLedger.open(reopened, DPSettings(enabled=True, target_epsilon=9.0), 1000, 16, 5)
    assert again == ledger and again.steps == 20 and again.target_epsilon == 3.0


def test_a_round_past_the_budget_is_refused_with_the_numbers(state):
    ledger = PrivacyLedger.open(state, SETTINGS, 1000, 16, steps_per_round=20)
    ledger.history = [(ledger.noise_multiplier, ledger.sample_rate, 60)]
    ledger.check_budget(0)
    with pytest.raises(BudgetExhausted, match=r"budget exhausted: ε would reach 3\.\d+ > target 3"):
        ledger.check_budget(20)


def test_a_client_whose_data_changed_size_is_stopped(state):
    PrivacyLedger.open(state, SETTINGS, 1000, 16, steps_per_round=20).save(state)
    with pytest.raises(FedPeftError, match="changed from 1000 to 1200 examples"):
        PrivacyLedger.open(state, SETTINGS, 1200, 16, steps_per_round=20)


def test_a_fixed_noise_multiplier_overrides_calibration(state):
    settings = DPSettings(enabled=True, target_epsilon=8.0, noise_multiplier=1.1, delta=1e-6)
    ledger = PrivacyLedger.open(state, settings, 50, 64, steps_per_round=5)
    assert ledger.noise_multiplier == 1.1 and ledger.sample_rate == 1.0 and ledger.delta == 1e-6


def test_the_budget_check_and_the_reported_epsilon_share_one_evaluation(state):
    ledger = PrivacyLedger.open(state, SETTINGS, 1000, 16, steps_per_round=20)
    spent_epsilon.cache_clear()
    predicted = ledger.epsilon(20)
    accountant = ledger.accountant()
    for _ in range(20):
        accountant.step(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate)
    ledger.record(accountant)
    assert ledger.epsilon() == predicted
    info = spent_epsilon.cache_info()
    assert (info.misses, info.hits) == (1, 1)


@pytest.mark.parametrize("delta", [1 / 1000, 0.01])
def test_a_delta_not_below_one_over_n_is_refused_with_n(state, delta):
    settings = DPSettings(enabled=True, target_epsilon=3.0, delta=delta)
    with pytest.raises(ConfigError, match=r"dp.delta=.* is not below 1/n_k = 1/1000 .*n_k=1000"):
        PrivacyLedger.open(state, settings, 1000, 16, steps_per_round=20)
    ok = DPSettings(enabled=True, target_epsilon=3.0, delta=0.999 / 1000)
    assert PrivacyLedger.open(state, ok, 1000, 16, steps_per_round=20).delta == 0.999 / 1000
