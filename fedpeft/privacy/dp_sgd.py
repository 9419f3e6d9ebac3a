"""The DP-SGD local training loop: Opacus per-sample clipping and noise on the trainable factors.

Built from Opacus' parts rather than `PrivacyEngine.make_private` so that the sampling rate the
accountant uses is the exact q = batch / n (make_private derives it as 1 / len(loader)), the
accountant can carry a client's history across rounds, and the hooks come off the shared model
after the round. Only the parameters that require grad (the adapter kind's factors and the head)
get per-sample gradients; the frozen base never does.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch
from opacus.accountants import IAccountant
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fedpeft.causal.loss import private_loss
from fedpeft.errors import FedPeftError
from fedpeft.privacy.gradient_canaries import HeldCanaries
from fedpeft.tasks import collate
from fedpeft.training import Example, TrainResult

# Opacus' hooks fire on module outputs because the frozen inputs need no gradient: expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _collate_or_none(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor] | None:
    return collate(batch, pad_token_id) if batch else None


def _empty_step_grads(params: Sequence[torch.nn.Parameter], ghost: bool) -> None:
    """Zero per-sample gradients for an empty Poisson batch, so the step is pure noise."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    grad_sample_mode: str = "hooks",
    generator: torch.Generator | None = None,
) -> DPOptimizer:
    """Opacus' DP optimiser: clip per example to C, add N(0, (sigma C)^2), divide by B."""
    return get_optimizer_class("flat", False, grad_sample_mode)(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )


def train_private(
    model: torch.nn.Module,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    pad_token_id: int,
    device: torch.device,
    seed: int,
    accountant: IAccountant | None = None,
    grad_sample_mode: str = "hooks",
    max_physical_batch_size: int | None = None,
    on_step: Callable[[], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    canaries: HeldCanaries | None = None,
) -> TrainResult:
    """Take `steps` DP-SGD steps on Poisson batches (rate `sample_rate`) of `examples`.

    Each example's gradient over the trainable parameters is clipped to `max_grad_norm`; Gaussian
    noise of std noise_multiplier x max_grad_norm is added to the sum, which is divided by the
    expected batch size q n. `accountant` is stepped once per optimiser step that happened, after
    the noise is drawn and before the parameters change; `on_step` runs right after it (the
    client writes its ledger there, so a crash mid-round loses no spending).

    `penalty`, a regulariser of the trainable parameters that does not depend on the data (e.g.
    rank_pruning's tail term), is part of the objective: its gradient is added to the noisy mean
    gradient before each step, outside per-example clipping (post-processing, no privacy cost).
    Inside the loss it would be lost: Opacus replaces p.grad by the clipped per-example sum, and
    its hooks see only module inputs, not a term built from the weights themselves.

    `canaries` (a privacy audit's gradient canaries, gradient_canaries.py) count as examples: n is
    len(examples) + their count, and each step adds the sampled ones to the clipped sum.
    """
    n = len(examples) + (canaries.count if canaries is not None else 0)
    ghost = grad_sample_mode == "ghost"
    trainable = [p for p in model.parameters() if p.requires_grad]
    _clear_opacus_attributes(model)  # a shared model must not carry a failed round's samples
    before = [p.detach().clone() for p in trainable]
    extra = {"max_grad_norm": max_grad_norm} if ghost else {}
    hooks = prepare_module(
        model,
        grad_sample_mode,
        wrap_model=False,
        batch_first=True,
        loss_reduction="mean",
        **extra,
    )
    try:
        dp_optimizer = make_dp_optimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(1, round(sample_rate * n)),
            grad_sample_mode=grad_sample_mode,
            generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
        if accountant is not None or on_step is not None or penalty is not None:
            dp_optimizer.attach_step_hook(
                _step_hook(accountant, sample_rate, on_step, _penalty_step(trainable, penalty))
            )
        if canaries is not None:
            _add_canaries_before_noise(dp_optimizer, canaries, sample_rate, max_grad_norm, seed + 2)
        criterion = (
            DPLossFastGradientClipping(
                hooks, dp_optimizer, torch.nn.CrossEntropyLoss(reduction="mean"), "mean"
            )
            if ghost
            else None
        )
        sampler = UniformWithReplacementSampler(
            num_samples=len(examples),
            sample_rate=sample_rate,
            generator=torch.Generator().manual_seed(seed),
            steps=steps,
        )
        loader = DataLoader(
            examples,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=functools.partial(_collate_or_none, pad_token_id=pad_token_id),
        )
        model.train()
        total, seen, taken = 0.0, 0, 0
        with BatchMemoryManager(
            data_loader=loader,
            max_physical_batch_size=max_physical_batch_size or len(examples),
            optimizer=dp_optimizer,
        ) as batches:
            for batch in batches:
                dp_optimizer.zero_grad(set_to_none=True)
                if batch is None:
                    _empty_step_grads(trainable, ghost)
                else:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    if batch["labels"].dim() == 2:  # causal LM: one mean loss per sequence
                        labels = batch.pop("labels")
                        loss = private_loss(model(**batch).logits, labels, criterion)
                    elif ghost:
                        labels = batch.pop("labels")
                        loss = criterion(model(**batch).logits, labels)
                    else:
                        loss = model(**batch).loss
                    loss.backward()
                    total += float(loss.detach()) * len(batch["input_ids"])
                    seen += len(batch["input_ids"])
                dp_optimizer.step()
                if dp_optimizer._is_last_step_skipped:
                    continue
                taken += 1
                if taken == 1:
                    _check_moved(trainable, before)
        return TrainResult(
            loss=total / max(seen, 1),
            steps=taken,
            num_examples=n,
            examples_seen=seen,
        )
    finally:
        hooks.cleanup()
        _clear_opacus_attributes(model)


def _add_canaries_before_noise(
    optimizer: DPOptimizer, canaries: HeldCanaries, sample_rate: float, bound: float, seed: int
) -> None:
    """Make each step add the sampled canaries to the clipped sums just before the noise.

    Opacus calls add_noise once per logical step (never on a skipped physical batch); the
    wrapper runs first there, on the same `summed_grad` tensors the noise is added to.
    """
    mine = {id(p) for p in optimizer.params}
    if any(id(p) not in mine for p in canaries.params):
        raise ValueError("gradient canaries sit on tensors this optimiser does not train")
    rng = torch.Generator().manual_seed(seed)
    noise = optimizer.add_noise

    def add_noise() -> None:
        summed = [p.summed_grad for p in canaries.params]
        canaries.add_sampled(summed, sample_rate, bound, rng)
        noise()

    optimizer.add_noise = add_noise  # type: ignore[method-assign]


def _penalty_step(
    params: Sequence[torch.nn.Parameter], penalty: Callable[[], torch.Tensor] | None
) -> Callable[[], None] | None:
    """Add the penalty's gradient to each parameter's (already noisy) gradient; None: none."""
    if penalty is None:
        return None

    def add() -> None:
        with torch.enable_grad():
            grads = torch.autograd.grad(penalty(), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g)

    return add


def _step_hook(
    accountant: IAccountant | None,
    sample_rate: float,
    on_step: Callable[[], None] | None,
    before: Callable[[], None] | None = None,
) -> Callable[[DPOptimizer], None]:
    """One Opacus step hook (it takes only one): `before`, the accountant, then `on_step`."""
    account = accountant.get_optimizer_hook_fn(sample_rate) if accountant is not None else None

    def hook(optimizer: DPOptimizer) -> None:
        if before is not None:
            before()
        if account is not None:
            account(optimizer)
        if on_step is not None:
            on_step()

    return hook


def _clear_opacus_attributes(model: torch.nn.Module) -> None:
    """Drop the per-sample state Opacus keeps on parameters and modules.

    A round that fails between forward and backward leaves captured activations behind; the next
    round's hooks would pair them with the wrong batch.
    """
    for p in model.parameters():
        for attr in (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in module.__dict__:
                delattr(module, attr)


def _check_moved(params: Sequence[torch.nn.Parameter], before: Sequence[torch.Tensor]) -> None:
    """Fail loudly if the first private step left every trainable tensor as it was."""
    if all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)):
        raise FedPeftError(
            "the first DP-SGD step left the adapter unchanged (per-sample gradients did not reach "
            "the optimiser): check that the model was moved to its device before the adapter "
            "was injected, and that train.lr > 0"
        )
