"""Server-side aggregation math of fedpeft's federated LoRA methods, on plain tensors.

Pure torch, batched over a leading layer axis L (layers of one shape). peft layout throughout:
A is (r, d_in), B is (d_out, r) and a layer's update is B @ A. See docs/algorithms.md for the
methods. Nothing here forms a d_out x d_in matrix, except merge_into_base_ (which updates the base
weight in place), lora_sb_init (which works on one layer's gradient by design) and stacked_svd
when the stacked rank reaches min(d_out, d_in) (where the dense SVD is the cheaper one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "fedex_aggregate",
    "fedmomentum_split",
    "fedrot_align",
    "procrustes_rotation",
    "fedsvd_refactor",
    "flexlora_truncate",
    "flora_stack",
    "lora_fair_closed_form",
    "lora_fair_residual",
    "lora_fair_residual_groups",
    "lora_product_norms",
    "lora_sb_init",
    "merge_into_base_",
    "normalize_weights",
    "orthonormal_init",
    "sparsity_weights",
    "stacked_svd",
    "weighted_average",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_weights(num_examples: Sequence[int] | Tensor) -> Tensor:
    """Client example counts n_k -> float64 weights p_k = n_k / sum_j n_j (shape (K,), sum 1)."""
    w = torch.as_tensor(num_examples, dtype=torch.float64)
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"need a non-empty 1-D list of example counts, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError(f"example counts must be finite and > 0, got {w.tolist()}")
    return w / w.sum()


def weighted_average(stack: Tensor, weights: Tensor) -> Tensor:
    """sum_k p_k x_k over the client axis: stack (K, ...), weights (K,) -> (...), in stack's dtype.

    Accumulates in float32 (float64 for float64 input): half-precision factors lose nothing extra.
    """
    if weights.ndim != 1 or weights.shape[0] != stack.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match stack {tuple(stack.shape)}")
    acc = _compute_dtype(stack.dtype)
    out = torch.tensordot(weights.to(stack.device, acc), stack.to(acc), dims=1)
    return out.to(stack.dtype)


def clip_rows(stack: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Scale each client's flattened update to L2 norm at most `bound` (DP-FedAvg's flat clip).

    stack (K, D) -> (clipped (K, D) in stack's dtype, norms (K,) in float64 before clipping).
    Norms accumulate in float64, so a row of norm exactly `bound` is not rescaled by rounding.
    """
    if stack.ndim != 2:
        raise ValueError(f"clip_rows takes a (clients, coordinates) stack: {tuple(stack.shape)}")
    norms = torch.linalg.vector_norm(stack.double(), dim=1)
    scale = torch.clamp(bound / norms.clamp_min(torch.finfo(torch.float64).tiny), max=1.0)
    return (stack.double() * scale[:, None]).to(stack.dtype), norms


def flora_stack(
    a_list: Sequence[Tensor], b_list: Sequence[Tensor], weights: Tensor, scalings: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """FLoRA: stack K client LoRAs of ranks r_k into one module of scaling 1.

    a_k (L, r_k, d_in), b_k (L, d_out, r_k) -> A_stack (L, sum r_k, d_in) = [s_k p_k A_k] and
    B_stack (L, d_out, sum r_k) = [B_k], so that B_stack @ A_stack = sum_k p_k s_k B_k A_k exactly.
    """
    k = len(a_list)
    if k == 0 or not (len(b_list) == len(scalings) == weights.shape[0] == k):
        raise ValueError("a_list, b_list, weights and scalings must hold the same K >= 1 clients")
    if any(a.shape[-2] != b.shape[-1] for a, b in zip(a_list, b_list, strict=True)):
        raise ValueError("each client's A (L, r_k, d_in) and B (L, d_out, r_k) must share r_k")
    a_stack = torch.cat(list(a_list), dim=-2)
    b_stack = torch.cat(list(b_list), dim=-1)
    dev = a_stack.device
    scale = torch.as_tensor(scalings, dtype=torch.float64, device=dev)
    scale = scale * weights.to(dev, torch.float64)
    ranks = torch.tensor([a.shape[-2] for a in a_list], device=dev)
    a_stack.mul_(scale.repeat_interleave(ranks).to(a_stack.dtype).unsqueeze(-1))
    return a_stack, b_stack


def merge_into_base_(weight: Tensor, b_stack: Tensor, a_stack: Tensor) -> Tensor:
    """W += B_stack @ A_stack in place, for W (L, d_out, d_in) or (d_out, d_in); returns W.

    One baddbmm_/addmm_ with inner dimension sum r_k writes into W's own storage: no second
    d_out x d_in matrix is allocated (W should be contiguous). W must be float32 (or float64): a
    half-precision base would round small updates away; the factors are cast to W's dtype.
    """
    if weight.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"merge the base weight in float32, got {weight.dtype}")
    b, a = b_stack.to(weight.dtype), a_stack.to(weight.dtype)
    if weight.ndim == 3:
        return weight.baddbmm_(b, a)
    if weight.ndim == 2:
        return weight.addmm_(b, a)
    raise ValueError(f"weight must be (L, d_out, d_in) or (d_out, d_in), got {tuple(weight.shape)}")


def fedsvd_refactor(b_bar: Tensor, a: Tensor, a_orthonormal: bool = False) -> tuple[Tensor, Tensor]:
    """FedSVD: re-factor b_bar @ a as B @ A with A's rows orthonormal and the singular values in B.

    b_bar (L, d_out, r), a (L, r, d_in) -> B = U S (L, d_out, r), columns orthogonal with norms the
    singular values, descending, and A = V^T (L, r, d_in). Thin form of docs/algorithms.md §4: QR of
    b_bar and of a^T and an SVD of the r x r core (or, if a's rows are already orthonormal, a thin
    SVD of b_bar alone), O((d_out + d_in) r^2) per layer; the d_out x d_in product is never formed.
    Computed in float32 (float64 for float64 input), returned in the input dtypes. A rank-deficient
    b_bar (b_bar = 0 at round 0) is fine: the SVD still returns a full orthogonal set of right
    singular vectors for the zero singular values, so A keeps orthonormal rows.
    """
    r = a.shape[-2]
    if b_bar.shape[-1] != r or r > min(b_bar.shape[-2], a.shape[-1]):
        raise ValueError(f"need r <= min(d_out, d_in), got {tuple(b_bar.shape)}, {tuple(a.shape)}")
    dt = _compute_dtype(b_bar.dtype)
    b_c, a_c = b_bar.to(dt), a.to(dt)
    if a_orthonormal:
        u, s, vh = torch.linalg.svd(b_c, full_matrices=False)
        new_b, new_a = u * s.unsqueeze(-2), vh @ a_c
    else:
        qb, rb = torch.linalg.qr(b_c)
        qa, ra = torch.linalg.qr(a_c.mT)
        uc, s, vch = torch.linalg.svd(rb @ ra.mT)
        new_b, new_a = (qb @ uc) * s.unsqueeze(-2), vch @ qa.mT
    return new_b.to(b_bar.dtype), new_a.to(a.dtype)


def procrustes_rotation(m: Tensor, strength: float = 1.0, allow_reflection: bool = False) -> Tensor:
    """FedRot-LoRA's r x r rotation: m (L, r, r) -> R (L, r, r), orthogonal, in m's dtype.

    R* = U V^T for m = U S V^T maximises tr(R^T m) over orthogonal R: with m = A A_ref^T it
    minimises ||R^T A - A_ref||_F, with m = B^T B_ref it minimises ||B R - B_ref||_F (orthogonal
    Procrustes). Unless `allow_reflection`, R* is kept in SO(r) by flipping the last singular
    direction where det(U V^T) < 0 (Kabsch). `strength` in [0, 1] interpolates from the identity
    (0: FedAvg) to R* (1) as R = polar((1 - strength) I + strength R*), the polar factor U_x V_x^T
    of X = U_x S_x V_x^T. Computed in float64 whatever the input dtype.
    """
    if m.ndim != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"m must be (L, r, r), got {tuple(m.shape)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    m64 = m.to(torch.float64)
    u, _, vh = torch.linalg.svd(m64)
    if not allow_reflection:
        flip = torch.linalg.det(u @ vh) < 0
        vh = vh.clone()
        vh[flip, -1, :] = -vh[flip, -1, :]
    best = u @ vh
    if strength < 1.0:
        eye = torch.eye(m.shape[-1], dtype=torch.float64, device=m.device).expand_as(best)
        ux, _, vxh = torch.linalg.svd((1.0 - strength) * eye + strength * best)
        best = ux @ vxh
    return best.to(m.dtype)


def fedrot_align(
    a: Tensor,
    b: Tensor,
    a_ref: Tensor,
    b_ref: Tensor,
    factor: str,
    strength: float = 1.0,
    allow_reflection: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rotate one client's LoRA pair towards a reference: (R^T A, B R), the product B A unchanged.

    a (L, r, d_in), b (L, d_out, r) are the client's factors, a_ref and b_ref the reference (the
    global pair the clients started the round from), all of one shape. `factor` ("A" or "B")
    names the factor the rotation is fitted on (procrustes_rotation with m = A A_ref^T, or
    m = B^T B_ref); one R per layer rotates both. Computed in float64, returned in the inputs'
    dtypes.
    """
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    if a.shape != a_ref.shape or b.shape != b_ref.shape or a.shape[-2] != b.shape[-1]:
        raise ValueError(
            f"need matching (L, r, d_in) and (L, d_out, r) pairs, got {tuple(a.shape)}, "
            f"{tuple(b.shape)}, {tuple(a_ref.shape)}, {tuple(b_ref.shape)}"
        )
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    ref = (a_ref if factor == "A" else b_ref).to(torch.float64)
    m = a64 @ ref.mT if factor == "A" else b64.mT @ ref
    rot = procrustes_rotation(m, strength, allow_reflection)
    return (rot.mT @ a64).to(a.dtype), (b64 @ rot).to(b.dtype)


def fedex_aggregate(
    a_stack: Tensor, b_stack: Tensor, weights: Tensor, scaling: float
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """FedEx-LoRA: (A_bar, B_bar) and the residual s (sum p_k B_k A_k - B_bar A_bar) as factors.

    a_stack (K, L, r, d_in), b_stack (K, L, d_out, r) -> A_bar (L, r, d_in), B_bar (L, d_out, r)
    and (A_R (L, (K-1) r, d_in), B_R (L, d_out, (K-1) r)) with B_R = [B_1 - B_K ... B_{K-1} - B_K]
    and A_R = [s p_1 (A_1 - A_bar); ...; s p_{K-1} (A_{K-1} - A_bar)], so that
    B_R A_R = s sum_k p_k (B_k - B_K)(A_k - A_bar) = s (sum_k p_k B_k A_k - B_bar A_bar) exactly
    (docs/algorithms.md §7): a module of scaling 1 to merge into the base. None when K = 1 (R = 0).
    Float32 (float64 for float64 input); the product R is never formed.
    """
    if weights.ndim != 1 or not (a_stack.shape[0] == b_stack.shape[0] == weights.shape[0]):
        raise ValueError("a_stack, b_stack and weights must hold the same K clients")
    dt = _compute_dtype(a_stack.dtype)
    a, b = a_stack.to(dt), b_stack.to(dt)
    a_bar, b_bar = weighted_average(a, weights), weighted_average(b, weights)
    k = a.shape[0]
    if k == 1:
        return a_bar, b_bar, None
    coef = (scaling * weights[:-1].to(a.device, torch.float64)).to(dt)
    a_res = (a[:-1] - a_bar) * coef[:, None, None, None]
    b_res = b[:-1] - b[-1]
    a_r = a_res.permute(1, 0, 2, 3).reshape(a.shape[1], (k - 1) * a.shape[2], a.shape[3])
    b_r = b_res.permute(1, 2, 0, 3).reshape(b.shape[1], b.shape[2], (k - 1) * b.shape[3])
    return a_bar, b_bar, (a_r.contiguous(), b_r.contiguous())


def stacked_svd(a_stack: Tensor, b_stack: Tensor) -> tuple[Tensor, Tensor]:
    """SVD of B_stack A_stack as (U S, V^T), singular values descending, all in U S.

    a_stack (L, R, d_in), b_stack (L, d_out, R) -> U S (L, d_out, q), V^T (L, q, d_in) with
    q = min(R, d_out, d_in) and V^T's rows orthonormal. For R < min(d_out, d_in) this is the thin
    form of §4/§9 (QR of both factors, SVD of the R x R core; the product is never formed); at
    larger R the dense product and its SVD are cheaper and are used. Float32 (float64 in, out).
    """
    if a_stack.shape[-2] != b_stack.shape[-1]:
        raise ValueError(f"stack ranks differ: {tuple(a_stack.shape)}, {tuple(b_stack.shape)}")
    rank, d_out, d_in = a_stack.shape[-2], b_stack.shape[-2], a_stack.shape[-1]
    dt = _compute_dtype(a_stack.dtype)
    if rank < min(d_out, d_in):
        return fedsvd_refactor(b_stack.to(dt), a_stack.to(dt))
    u, s, vh = torch.linalg.svd(b_stack.to(dt) @ a_stack.to(dt), full_matrices=False)
    return u * s.unsqueeze(-2), vh


def flexlora_truncate(
    us: Tensor, vh: Tensor, rank: int, scaling: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """FlexLoRA's rank-r factors of a client at scaling s: (A, B) with s B A the best rank-r fit.

    us (L, d_out, q), vh (L, q, d_in) from `stacked_svd` -> A = V^T[:r] (L, r, d_in), orthonormal
    rows, and B = (U S)[:, :r] / s (L, d_out, r), so s B A is the truncation of U S V^T to rank r
    (Eckart-Young). When r > q the extra columns of B are 0 and the extra rows of A complete an
    orthonormal set, drawn from `generator` (so that they train: a zero A row would not).
    """
    q, d_in = vh.shape[-2], vh.shape[-1]
    if not 1 <= rank <= min(us.shape[-2], d_in) or scaling <= 0:
        raise ValueError(f"need 1 <= rank <= min(d_out, d_in) and scaling > 0, got {rank}")
    a, b = vh[..., :rank, :], us[..., :rank] / scaling
    if rank > q:
        extra = torch.randn(
            vh.shape[0],
            d_in,
            rank - q,
            dtype=torch.float64,
            generator=generator,
            device=generator.device if generator is not None else vh.device,
        ).to(vh.device)
        v = vh.double().mT
        for _ in range(2):  # project out span(V) twice: orthogonal to working precision
            extra = extra - v @ (v.mT @ extra)
        extra = torch.linalg.qr(extra).Q
        a = torch.cat([a, extra.mT.to(vh.dtype)], dim=-2)
        b = torch.nn.functional.pad(b, (0, rank - q))
    return a.contiguous(), b.contiguous()


def fedmomentum_split(
    us: Tensor, vh: Tensor, rank: int, scaling: float, energy: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FedMomentum's split of the aggregate U S V^T into the next LoRA and a residual's extent.

    us (L, d_out, q), vh (L, q, d_in) from `stacked_svd` (singular values descending, in U S) ->
    A (L, r, d_in) = diag(sqrt(sigma / s)) V_r^T and B (L, d_out, r) = U_r diag(sqrt(sigma / s)),
    so that s B A = U_r S_r V_r^T (the best rank-r part, split evenly between the factors);
    r_eff (L,), the fewest leading components holding `energy` of sum sigma_i^2 (0 for a zero
    aggregate); and `dead` (L, r), the slots whose sigma_i <= 1e-12 sigma_1, where A's row and B's
    column are 0 (the caller re-seeds A's row: a zero row and column never train). Components
    r+1..r_eff are the residual the caller merges into the base; those past max(r, r_eff) are
    dropped. Float32 (float64 in, out).
    """
    q = vh.shape[-2]
    if not 1 <= rank <= q or scaling <= 0 or not 0 < energy <= 1:
        raise ValueError(
            f"need 1 <= rank <= {q}, scaling > 0 and energy in (0, 1], got {rank}, {scaling}, "
            f"{energy}"
        )
    sigma = torch.linalg.vector_norm(us, dim=-2)  # (L, q), descending
    power = sigma.double().square()
    total = power.sum(-1, keepdim=True)
    cumulative = power.cumsum(-1)
    r_eff = (cumulative < energy * total * (1 - 1e-12)).sum(-1) + 1
    r_eff = torch.where(total.squeeze(-1) > 0, r_eff.clamp(max=q), torch.zeros_like(r_eff))
    top = sigma[..., :rank]
    dead = top <= 1e-12 * sigma[..., :1]
    root = torch.sqrt(top / scaling)
    safe = torch.where(dead, torch.ones_like(top), top)
    a = vh[..., :rank, :] * torch.where(dead, 0.0, root).unsqueeze(-1)
    b = us[..., :rank] * torch.where(dead, 0.0, 1.0 / torch.sqrt(safe * scaling)).unsqueeze(-2)
    return a.contiguous(), b.contiguous(), r_eff, dead


def lora_product_norms(a: Tensor, b: Tensor) -> Tensor:
    """||B A||_F of each layer without forming B A: a (..., r, d_in), b (..., d_out, r) -> (...).

    ||B A||_F^2 = tr((B^T B)(A A^T)) = <B^T B, A A^T> (both r x r, symmetric): O((d_out + d_in) r^2)
    per layer. The Gram matrices are computed in float32 (float64 for float64 input), the trace and
    the square root in float64; a round-off negative trace counts as 0. Returns float64.
    """
    if a.shape[-2] != b.shape[-1]:
        raise ValueError(f"A {tuple(a.shape)} and B {tuple(b.shape)} must share the rank r")
    dt = _compute_dtype(a.dtype)
    a_c, b_c = a.to(dt), b.to(dt)
    gram_b, gram_a = (b_c.mT @ b_c).double(), (a_c @ a_c.mT).double()
    return (gram_b * gram_a).sum((-2, -1)).clamp_min(0).sqrt()


def sparsity_weights(norms: Tensor, fallback: Tensor) -> Tensor:
    """HetLoRA's sparsity weights w_k = S_k / sum_j S_j from client norms S (K,) (float64).

    When every S_k is 0 (every client's B A is zero, so the formula is 0 / 0) the weights are
    `fallback` (K,), the p_k.
    """
    s = norms.double()
    if s.ndim != 1 or s.shape != fallback.shape:
        raise ValueError(f"norms {tuple(s.shape)}, fallback {tuple(fallback.shape)} must be (K,)")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"norms must be finite and >= 0, got {s.tolist()}")
    total = s.sum()
    return fallback.double() if total == 0 else s / total


def _fair_stats(
    a_stack: Tensor, b_stack: Tensor, weights: Tensor, with_norm: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """A_bar, B_bar, then in float64 M = A_bar A_bar^T, G = sum_k p_k B_k A_k A_bar^T and ||dW*||.

    Uses the rank stacks As (L, K r, d_in), rows p_k A_k, and Bs (L, d_out, K r), so Bs As = dW*
    and ||dW*||^2 = <Bs^T Bs, As As^T> (the Gram-trace identity of §5). Reductions over d_in and
    d_out run in float32 (float64 for float64 input). The stacks are freed on return.
    """
    dt = _compute_dtype(a_stack.dtype)
    a_bar, b_bar = weighted_average(a_stack, weights), weighted_average(b_stack, weights)
    ones = [1.0] * a_stack.shape[0]
    a_s, b_s = flora_stack(a_stack.to(dt).unbind(0), b_stack.to(dt).unbind(0), weights, ones)
    a_bar_t = a_bar.to(dt).mT
    m = (a_bar_t.mT @ a_bar_t).double()
    g = (b_s @ (a_s @ a_bar_t)).double()
    x_norm = None
    if with_norm:
        gram_b, gram_a = (b_s.mT @ b_s).double(), (a_s @ a_s.mT).double()
        x_norm = (gram_b * gram_a).sum((-2, -1)).clamp_min(0).sqrt()
    return a_bar, b_bar, m, g, x_norm


def _fair_unit_stats(
    a_stack: Tensor, b_stack: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The §5 statistics in units of ||B_bar_l|| and ||A_bar_l||, per layer l.

    Returns A_bar (L, r, d_in), B_bar (L, d_out, r) in float64, the scale ||B_bar_l||_F (L,)
    float64 (1 where B_bar_l = 0), and in float64 the unit-scale B_bar / ||B_bar|| (L, d_out, r),
    M (L, r, r), G (L, d_out, r) and ||dW*|| (L,) of the client factors divided by their layer's
    ||B_bar|| and ||A_bar||. The cosine depends on neither scale, so these are the statistics of
    the same problem at unit scale, free of under- and overflow.
    """
    a_bar, b_bar = weighted_average(a_stack, weights), weighted_average(b_stack, weights)
    a_scale = a_bar.double().norm(dim=(-2, -1))
    b_scale = b_bar.double().norm(dim=(-2, -1))
    a_scale = torch.where(a_scale > 0, a_scale, 1.0)
    b_scale = torch.where(b_scale > 0, b_scale, 1.0)
    dt = _compute_dtype(a_stack.dtype)
    a_unit = a_stack.to(dt) / a_scale.to(dt)[:, None, None]
    b_unit = b_stack.to(dt) / b_scale.to(dt)[:, None, None]
    _, b_bar_unit, m, g, x_norm = _fair_stats(a_unit, b_unit, weights, with_norm=True)
    assert x_norm is not None
    return a_bar, b_bar.double(), b_scale, b_bar_unit.double(), m, g, x_norm


def _fair_layer_loss_grad(
    u: Tensor, b_bar: Tensor, m: Tensor, g: Tensor, x_norm: Tensor, lam: float
) -> tuple[Tensor, Tensor]:
    """Per-layer LoRA-FAIR loss (L,) and its gradient in u (L, d_out, r), at unit scale.

    B' = B_bar + u, with B_bar, M, G and ||dW*|| from `_fair_unit_stats`. By the §5 identities:
    <dW*, B' A_bar> = <G, B'>, ||B' A_bar||^2 = <B' M, B'>, and
    d(1 - cos)/dB' = -G / (|X||Y|) + cos * B' M / |Y|^2. A layer with |X| = 0 or |Y| = 0 has no
    defined cosine: it counts as cos = 0 with zero gradient, so its u only feels the lam term.
    """
    bp = b_bar + u
    bpm = bp @ m
    dot = (g * bp).sum((-2, -1))
    y_sq = (bpm * bp).sum((-2, -1)).clamp_min(0)
    valid = (x_norm > 0) & (y_sq > 0)
    denom = torch.where(valid, x_norm * y_sq.sqrt(), 1.0)
    cos = torch.where(valid, dot / denom, 0.0)
    coef_g = torch.where(valid, -1.0 / denom, 0.0)[:, None, None]
    coef_m = torch.where(valid, cos / torch.where(valid, y_sq, 1.0), 0.0)[:, None, None]
    loss = (1.0 - cos) + lam * u.square().sum((-2, -1))
    return loss, coef_g * g + coef_m * bpm + (2.0 * lam) * u


def lora_fair_residual_groups(
    groups: Sequence[tuple[Tensor, Tensor]],
    weights: Tensor,
    lam: float = 0.01,
    lr: float = 0.01,
    max_iter: int = 1000,
    tol: float = 1e-6,
    patience: int = 5,
) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Any]]:
    """LoRA-FAIR over every layer group at once: [(A_bar, B')] per group, and the solver's info.

    groups: per layer shape, (a_stack (K, L, r, d_in), b_stack (K, L, d_out, r)). Each layer's
    objective is [1 - cos(dW*, B' A_bar)] + lam ||dB||_F^2 / ||B_bar||_F^2 (whole-matrix cosine,
    B' = B_bar + dB, dB = 0 at start): the paper's objective measured in units of ||B_bar||, so
    that the problem, every SGD iterate and the result scale with B (B_k -> s B_k gives s B') and
    ignore the scale of A. Without it the cosine's gradient grows like 1 / ||B'|| and its
    curvature like 1 / ||B'||^2, so a fixed lr diverges for small B (early rounds) and stalls for
    large B. Plain SGD with step lr (the paper's) runs on dB / ||B_bar|| for all layers together,
    and one stopping rule watches the loss summed over all layers of all groups (docs/algorithms.md
    §5): stop after max_iter steps or once it has changed by less than tol for `patience` steps in
    a row. Each layer returns its best iterate, so no layer's loss ends above its start; a layer
    that no step improved keeps B_bar. Layers where dW* or B_bar A_bar is zero (round 0, all
    B = 0) keep B_bar. The iteration runs in float64 on the d_out x r factors (never a
    d_out x d_in matrix); B' is returned in each b_stack's dtype.
    info: iterations, initial_loss, final_loss (summed, at the returned B'), last_loss (at the
    last iterate), converged (the stopping rule fired and the last iterate is within tol of the
    returned loss), layers, fallback_layers (kept at B_bar: no step improved them),
    degenerate_layers (kept at B_bar: no cosine defined), and `groups`: the same per group.
    """
    if lr * lam >= 1:
        raise ValueError(f"plain SGD diverges with lr * lam >= 1 (lr={lr}, lam={lam}); lower lr")
    stats = [_fair_unit_stats(a, b, weights) for a, b in groups]
    state = [torch.zeros_like(b_bar) for _, _, _, b_bar, *_ in stats]

    def evaluate() -> tuple[list[Tensor], list[Tensor]]:
        pairs = [
            _fair_layer_loss_grad(u, b_bar, m, g, x_norm, lam)
            for u, (_, _, _, b_bar, m, g, x_norm) in zip(state, stats, strict=True)
        ]
        return [loss for loss, _ in pairs], [grad for _, grad in pairs]

    losses, grads = evaluate()
    initial = [loss.clone() for loss in losses]
    best_loss = [loss.clone() for loss in losses]
    best_u = [u.clone() for u in state]
    prev = last = sum(loss.sum().item() for loss in losses)
    iterations = streak = 0
    while iterations < max_iter and streak < patience:
        for u, grad in zip(state, grads, strict=True):
            u.sub_(grad, alpha=lr)
        iterations += 1
        losses, grads = evaluate()
        for i, loss in enumerate(losses):
            better = loss < best_loss[i]
            best_loss[i] = torch.where(better, loss, best_loss[i])
            best_u[i] = torch.where(better[:, None, None], state[i], best_u[i])
        last = sum(loss.sum().item() for loss in losses)
        streak = streak + 1 if abs(last - prev) < tol else 0
        prev = last
    results, per_group = [], []
    for (_, b_stack), (a_bar, b_orig, b_scale, b_bar, m, _, x_norm), u, start, best in zip(
        groups, stats, best_u, initial, best_loss, strict=True
    ):
        b_prime = b_orig + u * b_scale[:, None, None]
        results.append((a_bar, b_prime.to(b_stack.dtype)))
        valid = (x_norm > 0) & (((b_bar @ m) * b_bar).sum((-2, -1)) > 0)
        kept = u.abs().amax((-2, -1)) == 0
        per_group.append(
            {
                "layers": int(u.shape[0]),
                "initial_loss": start.sum().item(),
                "final_loss": best.sum().item(),
                "fallback_layers": int((valid & kept).sum()),
                "degenerate_layers": int((~valid).sum()),
            }
        )
    final = sum(group["final_loss"] for group in per_group)
    info = {
        "iterations": iterations,
        "initial_loss": sum(group["initial_loss"] for group in per_group),
        "final_loss": final,
        "last_loss": last,
        "converged": streak >= patience and last - final <= tol,
        "layers": sum(group["layers"] for group in per_group),
        "fallback_layers": sum(group["fallback_layers"] for group in per_group),
        "degenerate_layers": sum(group["degenerate_layers"] for group in per_group),
        "groups": per_group,
    }
    return results, info


def lora_fair_residual(
    a_stack: Tensor,
    b_stack: Tensor,
    weights: Tensor,
    lam: float = 0.01,
    lr: float = 0.01,
    max_iter: int = 1000,
    tol: float = 1e-6,
    patience: int = 5,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """LoRA-FAIR on one group of same-shaped layers: A_bar (L, r, d_in), B' (L, d_out, r), info.

    a_stack (K, L, r, d_in), b_stack (K, L, d_out, r). The solver of `lora_fair_residual_groups`
    (see there for the objective, the stopping rule and info) with a single group.
    """
    [(a_bar, b_prime)], info = lora_fair_residual_groups(
        [(a_stack, b_stack)], weights, lam, lr, max_iter, tol, patience
    )
    return a_bar, b_prime, info


def lora_fair_closed_form(
    a_stack: Tensor, b_stack: Tensor, weights: Tensor, lam: float = 0.01
) -> tuple[Tensor, Tensor]:
    """Squared-error LoRA-FAIR variant (not the paper's cosine objective), solved exactly.

    Minimises ||dW* - (B_bar + dB) A_bar||^2 + lam ||dB||^2: dB = (G - B_bar M)(M + lam I)^-1, one
    batched r x r solve per layer in float64. Shapes as lora_fair_residual; returns (A_bar, B').
    """
    a_bar, b_bar, m, g, _ = _fair_stats(a_stack, b_stack, weights, with_norm=False)
    b64 = b_bar.double()
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    db = torch.linalg.solve(m + lam * eye, g - b64 @ m, left=False)
    return a_bar, (b64 + db).to(b_stack.dtype)


def _haar_columns(num_layers: int, n: int, rank: int, generator: torch.Generator) -> Tensor:
    """(L, n, rank) float64 with Haar-distributed orthonormal columns, one draw per layer."""
    x = torch.randn(
        num_layers, n, rank, dtype=torch.float64, device=generator.device, generator=generator
    )
    q, r = torch.linalg.qr(x)
    return q * torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)


def orthonormal_init(
    num_layers: int,
    d_out: int,
    d_in: int,
    rank: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fed-SB data-free init, returned as (B, A, R): random orthonormal B and A, and R = 0.

    B (L, d_out, r) has orthonormal columns, A (L, r, d_in) orthonormal rows, R is (L, r, r).

    Every layer gets its own draw (the Fed-SB code's reset seed gives all same-shaped layers one A,
    a bug). Deterministic given the generator; drawn on the generator's device.
    """
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"need 1 <= rank <= min(d_out, d_in), got {rank} for {d_out}x{d_in}")
    b = _haar_columns(num_layers, d_out, rank, generator)
    a = _haar_columns(num_layers, d_in, rank, generator).mT
    r = torch.zeros(num_layers, rank, rank, dtype=dtype, device=generator.device)
    return b.to(dtype), a.to(dtype).contiguous(), r


def _randomized_svd(
    x: Tensor,
    rank: int,
    generator: torch.Generator | None,
    oversample: int = 10,
    power_iters: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the top-`rank` SVD of x by a randomised range finder with QR-stabilised powers."""
    dev = generator.device if generator is not None else x.device
    omega = torch.randn(
        x.shape[-1], rank + oversample, dtype=x.dtype, device=dev, generator=generator
    )
    q = torch.linalg.qr(x @ omega.to(x.device)).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(x @ torch.linalg.qr(x.mT @ q).Q).Q
    u, s, vh = torch.linalg.svd(q.mT @ x, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


def lora_sb_init(
    grad: Tensor, rank: int, lr: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA-SB init of one layer, as (B, R, A): the rank-r truncated SVD of dW1 = -lr sign(G).

    grad (d_out, d_in) -> B = U_r (d_out, r), R = diag(S_r) (r, r), A = V_r^T (r, d_in). Exact SVD
    when rank + 10 >= min(d_out, d_in); otherwise a randomised SVD (Halko et al.: 10 oversampling
    columns, 4 power iterations) drawn from `generator` (torch.svd_lowrank takes no generator).
    Float32 (float64 for float64 grad). One layer by design: peak memory is one layer's gradient.
    """
    if grad.ndim != 2 or not 1 <= rank <= min(grad.shape) or lr <= 0:
        raise ValueError(f"need a 2-D grad, 1 <= rank <= min(shape) and lr > 0, got {rank}, {lr}")
    dw1 = torch.sign(grad.to(_compute_dtype(grad.dtype))).mul_(-lr)
    if rank + 10 >= min(grad.shape):
        u, s, vh = torch.linalg.svd(dw1, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = _randomized_svd(dw1, rank, generator)
    return u.contiguous(), torch.diag(s), vh.contiguous()
