"""DP-SGD on a real tiny_bert LoRA: clipping bounds, noise scale, Poisson batches, guards."""

import math

import pytest
import torch

from fedpeft.errors import FedPeftError
from fedpeft.privacy.dp_sgd import make_dp_optimizer
from tests.privacy.conftest import flat, no_dropout, private_steps, sgd, trainable


def raw_gradient_norm(model, example) -> float:
    from fedpeft.data import collate

    model.zero_grad(set_to_none=True)
    model(**collate([example], 0)).loss.backward()
    norm = flat(p.grad for p in trainable(model)).norm()
    model.zero_grad(set_to_none=True)
    return float(norm)


def test_one_huge_gradient_moves_the_adapter_by_at_most_the_clip_norm(runtime, examples):
    model = runtime.model
    crafted = examples[0]
    raw = raw_gradient_norm(model, crafted)
    assert raw > 0
    # The clip norm is a thousandth of the example's own gradient, whatever the preset trains (the
    # dp presets freeze the head, which makes the raw norm small): a huge gradient next to C.
    clip = raw / 1000
    before = flat(trainable(model)).clone()
    # q = 1 over one example: it is in the batch; no noise; plain SGD with lr 1.
    result = private_steps(
        model, [crafted], sgd(model), sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=clip
    )
    moved = float((flat(trainable(model)) - before).norm())
    assert result.steps == 1
    assert moved <= clip * (1 + 1e-4)
    assert moved > 0.99 * clip  # clipped to C, not dropped


def test_added_noise_has_std_sigma_c_over_expected_batch(runtime):
    params = trainable(runtime.model)
    sigma, clip, batch = 2.0, 0.5, 16
    optimizer = make_dp_optimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(0),
    )
    deltas = []
    for _ in range(40):
        before = flat(params).clone()
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # a batch of 16 examples whose gradients are all zero: only noise remains
            p.grad_sample = torch.zeros((batch, *p.shape))
        optimizer.step()
        deltas.append(flat(params) - before)
    noise = torch.cat(deltas)
    assert noise.numel() > 100_000  # 40 draws of every trainable coordinate
    assert float(noise.mean()) == pytest.approx(0.0, abs=1e-3 * sigma * clip / batch * 10)
    assert float(noise.std()) == pytest.approx(sigma * clip / batch, rel=0.01)


def test_empty_poisson_batches_still_add_noise_and_count_as_steps(runtime, examples):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    before = flat(trainable(runtime.model)).clone()
    result = private_steps(
        runtime.model, examples, sgd(runtime.model), steps=3, sample_rate=1e-9,
        noise_multiplier=2.0, max_grad_norm=0.5, accountant=accountant,
    )  # fmt: skip
    moved = flat(trainable(runtime.model)) - before
    assert result.steps == 3 and accountant.history == [(2.0, 1e-9, 3)]
    # Expected batch max(1, q n) = 1: three steps of pure N(0, (sigma C)^2) noise each.
    assert float(moved.std()) == pytest.approx(math.sqrt(3) * 2.0 * 0.5, rel=0.03)


def test_physical_batch_cap_changes_memory_not_the_update(runtime, examples):
    def run(cap):
        runtime.reset({})
        with no_dropout(runtime.model):
            private_steps(
            runtime.model, examples, sgd(runtime.model, lr=0.5), steps=2, sample_rate=0.2,
            noise_multiplier=0.0, max_physical_batch_size=cap, seed=3,
        )  # fmt: skip
        return flat(trainable(runtime.model)).clone()

    whole, capped = run(None), run(4)  # ~20 examples per logical batch, physical batches of 4
    torch.testing.assert_close(capped, whole, rtol=1e-4, atol=1e-6)


def test_ghost_clipping_gives_the_hooks_update(runtime, examples):
    def run(mode):
        runtime.reset({})
        with no_dropout(runtime.model):
            result = private_steps(
                runtime.model, examples, sgd(runtime.model, lr=0.5), steps=2, sample_rate=0.1,
                noise_multiplier=0.0, max_grad_norm=0.05, grad_sample_mode=mode, seed=5,
            )  # fmt: skip
        return flat(trainable(runtime.model)).clone(), result

    (hooks, r1), (ghost, r2) = run("hooks"), run("ghost")
    assert r1.steps == r2.steps == 2
    torch.testing.assert_close(ghost, hooks, rtol=1e-3, atol=1e-6)


def test_hooks_come_off_the_shared_model_after_the_round(runtime, examples):
    private_steps(runtime.model, examples, sgd(runtime.model, lr=0.1))
    hooked = [m for m in runtime.model.modules() if m._forward_hooks or m._backward_hooks]
    assert hooked == []
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None
               for p in trainable(runtime.model))  # fmt: skip


def test_an_update_that_changes_nothing_fails_loudly(runtime, examples):
    with pytest.raises(FedPeftError, match="left the adapter unchanged"):
        private_steps(runtime.model, examples, sgd(runtime.model, lr=0.0), noise_multiplier=0.0)


def test_only_trainable_factors_get_per_sample_gradients(runtime, examples):
    frozen = {n: p.detach().clone() for n, p in runtime.model.named_parameters()
              if not p.requires_grad}  # fmt: skip
    private_steps(runtime.model, examples, sgd(runtime.model, lr=0.1))
    after = dict(runtime.model.named_parameters())
    assert frozen and all(torch.equal(after[n], t) for n, t in frozen.items())
