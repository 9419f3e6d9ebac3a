"""Per-client noise calibration: the sigma at which the planned run ends at the target epsilon."""

from __future__ import annotations

import math

from opacus.accountants.utils import get_noise_multiplier


def planned_rounds(rounds: int, num_clients: int, fraction: float, min_clients: int) -> int:
    """Rounds each client is expected to train in: rounds x (clients sampled / clients), rounded up.

    It mirrors the strategy's sampler (max(min_clients, fraction x N) of N nodes per round).
    A client sampled more often than expected runs out of budget and stops training early.
    """
    per_round = min(num_clients, max(min_clients, int(fraction * num_clients)))
    return max(1, math.ceil(rounds * per_round / num_clients))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest sigma whose `steps` steps at `sample_rate` spend at most the target epsilon."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    )
