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


def test_a_penalty_inside_the_loss_would_be_lost_under_opacus():
    """Why train_private takes the penalty apart: Opacus replaces p.grad by the clipped sum of
    per-example gradients from its module hooks, so a weight term in the loss changes nothing."""
    from opacus.grad_sample.utils import prepare_module

    from fedpeft.privacy.dp_sgd import make_dp_optimizer

    def step(weight_term: float) -> torch.Tensor:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        with torch.no_grad():
            model[0].weight.copy_(torch.arange(12.0).view(3, 4) / 10)
            model[0].bias.fill_(0.1)
        hooks = prepare_module(model, "hooks", wrap_model=False, loss_reduction="mean")
        optimizer = make_dp_optimizer(
            torch.optim.SGD(model.parameters(), lr=1.0),
            noise_multiplier=0.0,
            max_grad_norm=100.0,
            expected_batch_size=8,
        )
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        before = model[0].weight.detach().clone()
        loss = model(x).square().mean() + weight_term * model[0].weight.norm()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hooks.cleanup()
        return model[0].weight.detach() - before

    assert torch.equal(step(0.0), step(10.0))
