"""One client's private round: open its ledger, check the budget, train under DP-SGD, record."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
from flwr.app import RecordDict

from fedpeft.privacy.dp_sgd import train_private
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.settings import DPSettings
from fedpeft.training import Example, TrainResult


def private_round(
    model: torch.nn.Module,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    *,
    state: RecordDict,
    settings: DPSettings,
    steps: int,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    seed: int,
) -> tuple[TrainResult, dict[str, float]]:
    """Train `steps` DP-SGD steps and return the result with the privacy metrics for the reply.

    Raises BudgetExhausted before touching the model if the round would exceed the target. The
    steps taken are written to the node's ledger even if training fails part-way. The Poisson
    sampler and the noise draw from fresh OS entropy, never from `seed` (which the server knows:
    it could regenerate and subtract the noise), unless `settings.reproducible` asks for it.
    """
    if not settings.reproducible:
        seed = secrets.randbits(62)
    ledger = PrivacyLedger.open(state, settings, len(examples), batch_size, steps)
    ledger.check_budget(steps)
    accountant = ledger.accountant()
    try:
        result = train_private(
            model,
            examples,
            optimizer,
            steps=steps,
            sample_rate=ledger.sample_rate,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            pad_token_id=pad_token_id,
            device=device,
            seed=seed,
            accountant=accountant,
            grad_sample_mode=settings.grad_sample_mode,
            max_physical_batch_size=settings.max_physical_batch_size,
        )
    finally:
        ledger.record(accountant)
        ledger.save(state)
    return result, {
        "epsilon": ledger.epsilon(),
        "delta": ledger.delta,
        "noise-multiplier": ledger.noise_multiplier,
        "sample-rate": ledger.sample_rate,
        "dp-steps": ledger.steps,
    }
