"""Andrew et al.'s estimate: the two-Gaussian privacy profile is exact at every scale, and canary
clients in a Gaussian mechanism recover its epsilon; without noise the estimate explodes."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize
from scipy.stats import norm

from fedpeft import lowrank
from fedpeft.canary_clients import CanaryClients
from fedpeft.privacy.one_shot_estimate import estimate_epsilon, gaussian_delta, gaussian_epsilon


def gaussian_mechanism_delta(eps: float, mu: float) -> float:
    """Balle and Wang's exact delta(eps) of N(mu, 1) against N(0, 1)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 1e4])
@pytest.mark.parametrize("mu", [0.05, 0.5, 2.0, 6.0])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0, 4.0])
def test_equal_variances_match_the_gaussian_mechanism(scale, mu, eps):
    expected = gaussian_mechanism_delta(eps, mu)
    for got in (
        gaussian_delta(eps, mu * scale + 3 * scale, scale, 3 * scale, scale),
        gaussian_delta(eps, 0.0, scale, mu * scale, scale),  # the other direction: symmetric
    ):
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    ("mu_p", "s_p", "mu_q", "s_q"),
    [(1.0, 2.0, 0.0, 1.0), (0.0, 0.5, 0.2, 1.0), (3.0, 1.0001, 0.0, 1.0), (-1.0, 3.0, 1.0, 0.2)],
)
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
def test_unequal_variances_match_numerical_integration(mu_p, s_p, mu_q, s_q, eps):
    def gap(x):
        return norm.pdf(x, mu_p, s_p) - math.exp(eps) * norm.pdf(x, mu_q, s_q)

    lo = min(mu_p - 14 * s_p, mu_q - 14 * s_q)
    hi = max(mu_p + 14 * s_p, mu_q + 14 * s_q)
    grid = np.linspace(lo, hi, 20001)
    values = gap(grid)
    crossings = [
        optimize.brentq(gap, a, b, xtol=1e-14)
        for a, b, fa, fb in zip(grid, grid[1:], values, values[1:])
        if fa * fb < 0
    ]
    edges = [lo, *crossings, hi]
    expected = sum(
        max(integrate.quad(gap, a, b, epsabs=1e-14, limit=200)[0], 0.0)
        for a, b in zip(edges, edges[1:])
    )
    assert gaussian_delta(eps, mu_p, s_p, mu_q, s_q) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("mu", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5])
def test_the_epsilon_search_inverts_delta(mu, delta):
    eps = gaussian_epsilon(delta, mu, 1.0, 0.0, 1.0)
    assert gaussian_mechanism_delta(eps, mu) == pytest.approx(delta, rel=1e-3)
    assert gaussian_epsilon(delta, 0.0, 1.0, 0.0, 1.0) == 0.0
    assert gaussian_epsilon(delta, 1.0, 1e-9, 0.0, 1e-9) == math.inf


def _dp_fedavg(sigma: float, seed: int, rounds: int = 4, d: int = 5000, n: int = 20, k: int = 100):
    """DP-FedAvg with canary clients in every round: n clients send updates of norm 1 in random
    directions, the server averages them with k canary clients (canary_clients.py) and adds
    Gaussian noise of std sigma / (n + k) per coordinate (noise multiplier sigma on the sum)."""
    generator = torch.Generator().manual_seed(seed)
    clients = CanaryClients(k, seed=3 + seed, rate=1.0)
    initial = {"w": torch.zeros(d, dtype=torch.float64)}
    adapter = dict(initial)
    for server_round in range(1, rounds + 1):
        updates = []
        for _ in range(n):
            step = torch.randn(d, generator=generator, dtype=torch.float64)
            updates.append({"w": adapter["w"] + step / step.norm()})
        joined, p = clients.join(server_round, adapter, updates, [1.0] * n)
        mean = lowrank.weighted_average(torch.stack([u["w"] for u in joined]), p)
        noise = torch.randn(d, generator=generator, dtype=torch.float64)
        adapter = {"w": mean + sigma / (n + k) * noise}
    return clients, initial, adapter


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_canary_clients_in_dp_fedavg_recover_its_epsilon(sigma, seed):
    # a canary moves the sum by 1 a round against noise sigma: mu = sqrt(rounds) / sigma
    clients, initial, final = _dp_fedavg(sigma, seed)
    assert (clients.rounds_in == 4).all()
    inserted, null = clients.cosines(initial, final)
    assert null.std() == pytest.approx(1 / math.sqrt(5000), rel=0.2)  # about N(0, 1/d)
    estimate = estimate_epsilon(inserted, null, 1e-5)
    analytic = gaussian_epsilon(1e-5, 2.0 / sigma, 1.0, 0.0, 1.0)  # 10.0 and 4.38
    assert estimate.epsilon == pytest.approx(analytic, rel=0.2)  # measured 0.94-1.16x
    assert estimate.epsilon_two_gaussians >= estimate.epsilon * 0.9


def test_without_the_server_noise_the_estimate_explodes():
    clients, initial, final = _dp_fedavg(0.0, 0)
    estimate = estimate_epsilon(*clients.cosines(initial, final), 1e-5)
    assert estimate.epsilon > 4 * gaussian_epsilon(1e-5, 2.0, 1.0, 0.0, 1.0)  # 55 against 10


def test_canary_clients_refuse_replies_shaped_unlike_the_global_adapter():
    clients = CanaryClients(4, seed=0, rate=1.0)
    with pytest.raises(Exception, match="audit it without canary_clients"):
        clients.join(1, {"w": torch.zeros(3)}, [{"w": torch.zeros(4)}], [1.0])
    with pytest.raises(Exception, match="canary_clients=1 must be in"):
        CanaryClients(1, seed=0, rate=1.0)
