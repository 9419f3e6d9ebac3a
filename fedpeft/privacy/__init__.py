"""Example-level DP-SGD on clients: settings, noise calibration, the privacy ledger, training."""

from fedpeft.privacy.calibration import calibrate_noise, planned_rounds
from fedpeft.privacy.client_round import private_round
from fedpeft.privacy.dp_sgd import train_private
from fedpeft.privacy.ledger import BudgetExhausted, PrivacyLedger
from fedpeft.privacy.settings import DPSettings, default_delta, validate_dp

__all__ = [
    "BudgetExhausted",
    "DPSettings",
    "PrivacyLedger",
    "calibrate_noise",
    "default_delta",
    "planned_rounds",
    "private_round",
    "train_private",
    "validate_dp",
]
