"""Example-level DP-SGD on clients: settings, node policy, calibration, the ledger, training."""

import importlib
from typing import Any

#: where each name lives; imported on first use (PEP 562), so that a process that needs only
#: the node's policy (a SecAgg+ key exchange) does not import opacus, torch and transformers
_HOMES = {
    "calibrate_noise": "fedpeft.privacy.calibration",
    "planned_rounds": "fedpeft.privacy.calibration",
    "small_client_warning": "fedpeft.privacy.calibration",
    "PrivateRoundFailed": "fedpeft.privacy.client_round",
    "private_round": "fedpeft.privacy.client_round",
    "train_private": "fedpeft.privacy.dp_sgd",
    "HeldCanaries": "fedpeft.privacy.gradient_canaries",
    "canary_keys": "fedpeft.privacy.gradient_canaries",
    "BudgetExhausted": "fedpeft.privacy.ledger",
    "PrivacyLedger": "fedpeft.privacy.ledger",
    "LedgerCorrupt": "fedpeft.privacy.ledger_file",
    "LedgerFile": "fedpeft.privacy.ledger_file",
    "NodePolicy": "fedpeft.privacy.policy",
    "PolicyViolation": "fedpeft.privacy.policy",
    "default_state_dir": "fedpeft.privacy.policy",
    "PRIVATE_REPLY_METRICS": "fedpeft.privacy.release",
    "private_reply_metrics": "fedpeft.privacy.release",
    "DPSettings": "fedpeft.privacy.settings",
    "default_delta": "fedpeft.privacy.settings",
    "validate_dp": "fedpeft.privacy.settings",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
