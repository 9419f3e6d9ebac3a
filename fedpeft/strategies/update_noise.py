"""How much of a private round's aggregated update is DP noise: its norm beside the noise's.

A DP-SGD client with plain SGD (no momentum) at learning rate lr adds, every step, Gaussian noise
of std sigma_k C / B_k to each coordinate's mean gradient (B_k = round(q_k n_k), Opacus' expected
batch), so after T_k steps its tensors carry noise of std lr sigma_k C sqrt(T_k) / B_k per
coordinate. The weighted average of K replies (weights p_k) then carries per-coordinate noise of
variance sum_k p_k^2 (lr sigma_k C)^2 T_k / B_k^2: over d coordinates its expected squared norm is
d times that. The signal's norm is estimated as sqrt(max(||Delta||^2 - E||noise||^2, 0)), Delta the
average minus the global the clients started from. Everything here comes from the replies'
data-independent metrics (sigma, q, n, steps) and the round's tensors, so the server can log it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft.protocol import NOISE_MULTIPLIER, NUM_EXAMPLES, SAMPLE_RATE, STEPS


def client_noise_std(
    metrics: Mapping[str, float | int], lr: float, max_grad_norm: float
) -> float | None:
    """Per-coordinate std of the DP noise in one client's trained tensors after its round.

    None when the reply carries no DP ledger (a non-private reply).
    """
    keys = (NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, NUM_EXAMPLES)
    if any(k not in metrics for k in keys):
        return None
    sigma, q = float(metrics[NOISE_MULTIPLIER]), float(metrics[SAMPLE_RATE])
    steps, n = int(metrics[STEPS]), int(metrics[NUM_EXAMPLES])
    batch = max(1, round(q * n))
    return lr * sigma * max_grad_norm * math.sqrt(steps) / batch


def update_and_noise_norms(
    before: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    noise_stds: Sequence[float],
    lr_by_key: Mapping[str, float] | None = None,
) -> tuple[float, float] | None:
    """(||Delta||, expected ||noise||) of the weighted average of `updates` against `before`.

    `before` holds the global tensors the clients started from; only keys every update holds with
    the global's shape count (per-client ranks have no common Delta: None then).
    weights: (K,) summing to 1; noise_stds: (K,) from `client_noise_std`; lr_by_key scales a key's
    noise by its own rate when the stds were computed at lr 1 (the head trains at train.head_lr).
    """
    keys = [k for k in before if all(k in u and u[k].shape == before[k].shape for u in updates)]
    if not keys or len(keys) < len(before):
        return None
    p = weights.to(torch.float64)
    update_sq, coords = 0.0, 0.0
    for key in keys:
        stacked = torch.stack([u[key].to(torch.float64) for u in updates])  # (K, *shape)
        mean = torch.tensordot(p, stacked, dims=1)
        update_sq += float((mean - before[key].to(torch.float64)).pow(2).sum())
        coords += before[key].numel() * (lr_by_key or {}).get(key, 1.0) ** 2
    variance = float(sum(pk**2 * s**2 for pk, s in zip(p.tolist(), noise_stds, strict=True)))
    return math.sqrt(update_sq), math.sqrt(coords * variance)


def signal_norm(update_norm: float, noise_norm: float) -> float:
    """The estimated norm of the update without its noise: sqrt(max(||Delta||^2 - noise^2, 0))."""
    return math.sqrt(max(update_norm**2 - noise_norm**2, 0.0))


def round_norms(
    task: Mapping[str, Any],
    before: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    metrics: Sequence[Mapping[str, Any]],
    head_keys: set[str],
) -> tuple[float, float | None] | None:
    """A round's (||Delta||, expected ||noise|| or None) from the task and its accepted replies.

    The noise is known only for private replies trained with plain SGD (no momentum), at the
    task's learning rates (the head's own when it has one); None where it is not.
    """
    dp, train = task.get("dp") or {}, task.get("train") or {}
    plain_sgd = dp.get("enabled") and train.get("optimizer") == "sgd" and not train.get("momentum")
    stds = [
        client_noise_std(m, 1.0, float(dp["max_grad_norm"])) if plain_sgd else None for m in metrics
    ]
    lr, head_lr = float(train.get("lr") or 0.0), train.get("head_lr")
    rates = {k: float(head_lr) if k in head_keys and head_lr is not None else lr for k in before}
    norms = update_and_noise_norms(before, updates, weights, [s or 0.0 for s in stds], rates)
    if norms is None:
        return None
    return norms[0], norms[1] if None not in stds else None
