"""Example-level DP-SGD on clients: settings, node policy, calibration, the ledger, training."""

from fedpeft.privacy.calibration import calibrate_noise, planned_rounds, small_client_warning
from fedpeft.privacy.client_round import PrivateRoundFailed, private_round
from fedpeft.privacy.dp_sgd import train_private
from fedpeft.privacy.gradient_canaries import HeldCanaries, canary_keys
from fedpeft.privacy.ledger import BudgetExhausted, PrivacyLedger
from fedpeft.privacy.ledger_file import LedgerCorrupt, LedgerFile
from fedpeft.privacy.policy import NodePolicy, PolicyViolation, default_state_dir
from fedpeft.privacy.release import PRIVATE_REPLY_METRICS, private_reply_metrics
from fedpeft.privacy.settings import DPSettings, default_delta, validate_dp

__all__ = [
    "PRIVATE_REPLY_METRICS",
    "BudgetExhausted",
    "DPSettings",
    "HeldCanaries",
    "LedgerCorrupt",
    "LedgerFile",
    "NodePolicy",
    "PolicyViolation",
    "PrivacyLedger",
    "PrivateRoundFailed",
    "calibrate_noise",
    "canary_keys",
    "default_delta",
    "default_state_dir",
    "planned_rounds",
    "private_reply_metrics",
    "private_round",
    "small_client_warning",
    "train_private",
    "validate_dp",
]
