"""A data-independent penalty under DP-SGD (privacy/dp_sgd.py): its gradient joins the noisy one."""

import pytest
import torch

from fedpeft import adapters
from fedpeft.clients.rank_pruning import tail_score
from tests.privacy.conftest import flat, no_dropout, private_steps, sgd, trainable


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_the_penalty_gradient_is_added_after_clipping_and_noise(runtime, examples, mode):
    """Same seed, with and without lambda * tail score: the SGD steps differ by exactly
    -lr * its gradient, so the regulariser is neither clipped, nor noised, nor lost."""
    model = runtime.model
    g = torch.Generator().manual_seed(0)
    start = {
        k: torch.randn(v.shape, generator=g)
        for k, v in adapters.adapter_tensors(model).items()
        if k.endswith((".lora_A", ".lora_B"))
    }
    live = {k: v for k, v in adapters.adapter_tensors(model).items() if k in start}

    def penalty():
        return 0.3 * tail_score(live, 6)

    moved = []
    for pen in (None, penalty):
        runtime.reset(start)
        with no_dropout(model):
            private_steps(model, examples, sgd(model, lr=0.1), penalty=pen, grad_sample_mode=mode)
        moved.append(flat(trainable(model)).clone())
    runtime.reset(start)
    params = trainable(model)
    grads = torch.autograd.grad(penalty(), params, allow_unused=True)
    expected = -0.1 * flat(
        torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads, strict=True)
    )
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(moved[1] - moved[0], expected, rtol=1e-4, atol=1e-6)
