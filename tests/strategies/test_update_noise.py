"""The noise norm a private round's aggregate is expected to carry, against Opacus and sampling."""

import math

import pytest
import torch

from fedpeft.privacy.dp_sgd import make_dp_optimizer
from fedpeft.protocol import NUM_EXAMPLES
from fedpeft.strategies.update_noise import client_noise_std, signal_norm, update_and_noise_norms


@pytest.mark.parametrize(("lr", "sigma", "clip", "steps"), [(0.5, 1.1, 2.0, 3), (20, 0.7, 0.05, 5)])
def test_the_client_noise_std_is_what_opacus_adds_over_a_round(lr, sigma, clip, steps):
    torch.manual_seed(0)
    d, n, q = 60_000, 1000, 0.128
    p = torch.nn.Parameter(torch.zeros(d))
    dp = make_dp_optimizer(
        torch.optim.SGD([p], lr=lr),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=round(q * n),
        generator=torch.Generator().manual_seed(1),
    )
    for _ in range(steps):  # a zero data gradient: the round's change is the noise alone
        p.grad_sample = torch.zeros(7, d)
        dp.step()
        dp.zero_grad()
    metrics = {"noise-multiplier": sigma, "sample-rate": q, "steps": steps, NUM_EXAMPLES: n}
    expected = client_noise_std(metrics, lr, clip)
    assert float(p.detach().std()) == pytest.approx(expected, rel=0.015)  # sd error ~0.3%
    assert client_noise_std({"steps": 3}, lr, clip) is None  # a non-private reply


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_update_and_noise_norms_over_magnitudes(scale):
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (8, 384), "b": (384, 8), "c": (3, 5)}
    before = {k: scale * torch.randn(s, generator=g) for k, s in shapes.items()}
    signal = {k: scale * torch.randn(s, generator=g) for k, s in shapes.items()}
    stds = [0.3 * scale, 0.1 * scale, 0.05 * scale]
    weights = torch.tensor([0.5, 0.3, 0.2])
    updates = [
        {k: before[k] + signal[k] + s * torch.randn(sh, generator=g) for k, sh in shapes.items()}
        for s in stds
    ]
    update, noise = update_and_noise_norms(before, updates, weights, stds)
    exact = math.sqrt(
        sum(
            float((sum(w * u[k].double() for w, u in zip(weights.tolist(), updates, strict=True))
                   - before[k].double()).pow(2).sum())
            for k in shapes
        )
    )  # fmt: skip
    assert update == pytest.approx(exact, rel=1e-12)
    d = sum(math.prod(s) for s in shapes.values())
    assert noise == pytest.approx(math.sqrt(d * sum((w * s) ** 2 for w, s in zip(
        weights.tolist(), stds, strict=True))), rel=1e-12)  # fmt: skip
    true_signal = math.sqrt(sum(float(v.double().pow(2).sum()) for v in signal.values()))
    assert signal_norm(update, noise) == pytest.approx(true_signal, rel=0.05)


def test_replies_of_other_shapes_have_no_common_update():
    before = {"b": torch.zeros(4, 8)}
    updates = [{"b": torch.zeros(4, 8)}, {"b": torch.zeros(4, 4)}]
    assert update_and_noise_norms(before, updates, torch.tensor([0.5, 0.5]), [1.0, 1.0]) is None
