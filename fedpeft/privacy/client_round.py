"""One client's private round: open its ledger, hold it to the node's policy, train, record."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence

import torch

from fedpeft.errors import FedPeftError
from fedpeft.privacy.dp_sgd import train_private
from fedpeft.privacy.gradient_canaries import HeldCanaries
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.ledger_file import LedgerFile
from fedpeft.privacy.policy import NodePolicy
from fedpeft.privacy.settings import DPSettings
from fedpeft.protocol import DP_STEPS, NOISE_MULTIPLIER, SAMPLE_RATE
from fedpeft.training import Example, TrainResult

logger = logging.getLogger(__name__)


class PrivateRoundFailed(FedPeftError):
    """Private training failed; the cause stays in the node's log (it may describe the data)."""


def private_round(
    model: torch.nn.Module,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    *,
    store: LedgerFile,
    policy: NodePolicy,
    settings: DPSettings,
    steps: int,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    seed: int,
    penalty: Callable[[], torch.Tensor] | None = None,
    canaries: HeldCanaries | None = None,
) -> tuple[TrainResult, dict[str, float]]:
    """Train `steps` DP-SGD steps and return the result with the privacy metrics for the reply.

    Raises PolicyViolation or BudgetExhausted before touching the model if the calibrated delta or
    noise is weaker than the node's policy or the round would exceed the budget (the smaller of
    the ledger's target and the policy's epsilon), or would take the node's spending on this
    data over all runs past the policy's lifetime cap. The ledger's lock is held from the budget
    check to the last write, so rounds handled at once spend in turn. The ledger file is written
    before the first
    step and after every step, so a crash part-way loses no spending. The Poisson sampler and the
    noise draw from fresh OS entropy, never from `seed` (which the server knows: it could
    regenerate and subtract the noise), unless `settings.reproducible` asks for it and the
    policy allows it (simulations only). `penalty` is a data-independent regulariser of the
    loss (see train_private). An unexpected error is reported without its message, which could
    quote the private data; the node's log keeps it whole.
    """
    if not settings.reproducible:
        seed = secrets.randbits(62)
    with store.lock():  # from the budget check to the last write: concurrent rounds queue
        n = len(examples) + (canaries.count if canaries is not None else 0)
        ledger = PrivacyLedger.open(store, settings, n, batch_size, steps)
        policy.check_delta(ledger.delta)
        policy.check_noise(ledger.noise_multiplier)
        if policy.epsilon is not None:
            ledger.target_epsilon = min(ledger.target_epsilon, policy.epsilon)
        ledger.check_budget(steps)
        ledger.check_lifetime(steps, policy.lifetime_epsilon)
        ledger.save(store)
        accountant = ledger.accountant()

        def persist() -> None:
            ledger.record(accountant)
            ledger.save(store)

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
                on_step=persist,
                penalty=penalty,
                canaries=canaries,
            )
        except FedPeftError:
            raise
        except Exception as exc:
            logger.exception("private training failed after %d steps", ledger.steps)
            raise PrivateRoundFailed(
                f"private training failed ({type(exc).__name__}) after {ledger.steps} DP-SGD "
                "steps in all; the message stays in this node's log, since it could describe "
                "private data"
            ) from exc
        finally:
            persist()
        return result, {
            "epsilon": ledger.epsilon(),
            "delta": ledger.delta,
            NOISE_MULTIPLIER: ledger.noise_multiplier,
            SAMPLE_RATE: ledger.sample_rate,
            DP_STEPS: ledger.steps,
        }
