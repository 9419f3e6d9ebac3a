"""Per-client noise calibration: the sigma at which the planned run ends at the target epsilon."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

from opacus.accountants.utils import get_noise_multiplier


def planned_rounds(rounds: int, num_clients: int, fraction: float, min_clients: int) -> int:
    """Rounds each client is expected to train in: rounds x (clients sampled / clients), rounded up.

    It mirrors the strategy's sampler (max(min_clients, fraction x N) of N nodes per round).
    A client sampled more often than expected runs out of budget and stops training early.
    """
    per_round = min(num_clients, max(min_clients, int(fraction * num_clients)))
    return max(1, math.ceil(rounds * per_round / num_clients))


@functools.lru_cache(maxsize=64)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest sigma whose `steps` steps at `sample_rate` spend at most the target epsilon.

    Cached: a run's configuration is validated before its server calibrates the same numbers.
    """
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


#: a client whose calibrated sigma is at least this multiple of the median client's is warned of
SMALL_CLIENT_RATIO = 1.5


def small_client_warning(
    sizes: Sequence[int],
    target_epsilon: float,
    delta: float | None,
    accountant: str,
    planned_rounds: int,
    batch_size: int,
    steps_for: Callable[[int], int],
) -> str | None:
    """A warning when the smallest client's sigma is far above the median client's, else None.

    Each client is calibrated on its own q = batch / n_k and planned steps, so a client with few
    examples needs much more noise for the same epsilon and its updates are mostly noise. Two
    calibrations (smallest and median client), whatever the number of clients. `delta` None: each
    client's default 1/n_k rounded down to a power of ten (at most 1e-5).
    """
    from fedpeft.privacy.settings import default_delta

    if len(sizes) < 2:
        return None
    ordered = sorted(sizes)
    small, median = ordered[0], ordered[len(ordered) // 2]
    if small == median:
        return None

    def sigma(n: int) -> float:
        rate = min(1.0, batch_size / n)
        steps = planned_rounds * steps_for(n)
        return calibrate_noise(target_epsilon, delta or default_delta(n), rate, steps, accountant)

    low, typical = sigma(small), sigma(median)
    if low < SMALL_CLIENT_RATIO * typical:
        return None
    count = sum(1 for n in sizes if n < median / 2)
    return (
        f"the smallest client (n_k={small}) needs noise multiplier {low:.2f} at batch {batch_size} "
        f"for epsilon {target_epsilon:g}, against {typical:.2f} for the median client "
        f"(n_k={median}); {count} of {len(sizes)} clients hold under half the median's examples, "
        "and their updates will be mostly noise: merge small clients, exclude them, or raise "
        "dp.target_epsilon (docs/privacy.md, 'Small clients')"
    )
