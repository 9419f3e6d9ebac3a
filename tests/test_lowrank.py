"""Property tests of fedpeft.lowrank against float64 dense references (the references live here)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedpeft.lowrank as lowrank
from fedpeft.lowrank import (
    fedsvd_refactor,
    flora_stack,
    lora_fair_closed_form,
    lora_fair_residual,
    lora_sb_init,
    merge_into_base_,
    normalize_weights,
    orthonormal_init,
    weighted_average,
)

PROPS = settings(max_examples=25, deadline=None, database=None)
F64 = torch.float64


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """Small shapes, a seed and K client example counts."""
    d_out, d_in = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    k = draw(st.integers(1, 4))
    return {
        "layers": draw(st.integers(1, 3)),
        "d_out": d_out,
        "d_in": d_in,
        "rank": draw(st.integers(1, min(d_out, d_in))),
        "counts": draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def client_factors(p: dict, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """a (K, L, r, d_in) with entries of scale 1/sqrt(d_in), b (K, L, d_out, r) of scale 1."""
    g = torch.Generator().manual_seed(p["seed"])
    shape = (len(p["counts"]), p["layers"])
    a = torch.randn(*shape, p["rank"], p["d_in"], generator=g, dtype=F64) / math.sqrt(p["d_in"])
    b = torch.randn(*shape, p["d_out"], p["rank"], generator=g, dtype=F64)
    return a.to(dtype), b.to(dtype)


def dense_ideal(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dW* = sum_k p_k B_k A_k, dense, float64: (L, d_out, d_in)."""
    return torch.einsum("k,klor,klri->loi", w.to(F64), b.to(F64), a.to(F64))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.to(F64) - ref.to(F64)).norm() / ref.to(F64).norm()).item()


def dense_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whole-matrix cosine per layer of (L, m, n) stacks."""
    return (x * y).sum((-2, -1)) / (x.norm(dim=(-2, -1)) * y.norm(dim=(-2, -1)))


def fair_unit(b_bar: torch.Tensor) -> torch.Tensor:
    """||B_bar_l||_F per layer (1 where B_bar_l = 0), broadcastable to (L, d_out, r)."""
    c = b_bar.norm(dim=(-2, -1))
    return torch.where(c > 0, c, 1.0)[:, None, None]


def dense_fair_layer_loss(x, b_prime, a_bar, b_bar, lam):
    """Dense per-layer LoRA-FAIR loss: 1 - cos(dW*, B' A_bar) + lam ||dB||^2 / ||B_bar||^2."""
    reg = ((b_prime - b_bar) / fair_unit(b_bar)).square().sum((-2, -1))
    return (1 - dense_cos(x, b_prime @ a_bar)) + lam * reg


def dense_fair_loss(x, b_prime, a_bar, b_bar, lam):
    """The dense objective summed over layers."""
    return dense_fair_layer_loss(x, b_prime, a_bar, b_bar, lam).sum()


def dense_fair_solve(dense_groups, lam=0.01, lr=0.01, max_iter=1000, tol=1e-6, patience=5):
    """The specified solver, densely, by autograd: [(x, a_bar, b_bar)] -> ([B'], iterations).

    SGD with step lr on dB / ||B_bar|| (so dB moves by lr ||B_bar||^2 times its gradient), all
    groups at once, one stopping rule on the summed loss, and each layer's best iterate returned.
    """
    dbs = [torch.zeros_like(b_bar, requires_grad=True) for _, _, b_bar in dense_groups]

    def losses():
        return [
            dense_fair_layer_loss(x, b_bar + db, a_bar, b_bar, lam)
            for db, (x, a_bar, b_bar) in zip(dbs, dense_groups)
        ]

    current = losses()
    best = [(loss.detach().clone(), db.detach().clone()) for loss, db in zip(current, dbs)]
    prev = sum(loss.sum().item() for loss in current)
    iterations = streak = 0
    while iterations < max_iter and streak < patience:
        grads = torch.autograd.grad(sum(loss.sum() for loss in current), dbs)
        with torch.no_grad():
            for db, grad, (_, _, b_bar) in zip(dbs, grads, dense_groups):
                db -= lr * fair_unit(b_bar).square() * grad
        iterations += 1
        current = losses()
        for i, (loss, db) in enumerate(zip(current, dbs)):
            better = loss.detach() < best[i][0]
            best[i] = (
                torch.where(better, loss.detach(), best[i][0]),
                torch.where(better[:, None, None], db.detach(), best[i][1]),
            )
        cur = sum(loss.sum().item() for loss in current)
        streak = streak + 1 if abs(cur - prev) < tol else 0
        prev = cur
    return [b_bar + db for (_, db), (_, _, b_bar) in zip(best, dense_groups)], iterations


def dense_fair_problem(a, b, w):
    """(dW*, A_bar, B_bar) in float64 for the dense solver."""
    return dense_ideal(a, b, w), weighted_average(a.to(F64), w), weighted_average(b.to(F64), w)


def orthonormality_error(rows: torch.Tensor) -> float:
    """max over layers of ||X X^T - I||_F for X (..., r, n) with r <= n."""
    eye = torch.eye(rows.shape[-2], dtype=rows.dtype)
    return (rows @ rows.mT - eye).norm(dim=(-2, -1)).max().item()


# ---------------------------------------------------------------- weights and averaging


@PROPS
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=20))
def test_normalize_weights_sums_to_one(counts: list[int]) -> None:
    w = normalize_weights(counts)
    assert w.dtype == F64 and w.shape == (len(counts),)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-12)
    assert torch.allclose(w * sum(counts), torch.tensor(counts, dtype=F64))


@pytest.mark.parametrize(
    "bad", [[], [0, 3], [5, -1], [float("nan"), 1.0], [float("inf"), 1.0], [[1, 2]]]
)
def test_normalize_weights_rejects(bad: list) -> None:
    with pytest.raises(ValueError):
        normalize_weights(bad)
    with pytest.raises(ValueError):
        normalize_weights(torch.tensor(bad, dtype=F64))


@PROPS
@given(problems())
def test_fedavg_averages_each_factor(p: dict) -> None:
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    for stack in (a, b):
        ref = sum(w[k] * stack[k] for k in range(len(w)))
        assert torch.allclose(weighted_average(stack, w), ref, rtol=1e-12, atol=1e-14)
    for dtype in (torch.float32, torch.bfloat16):
        out = weighted_average(b.to(dtype), w)
        assert out.dtype == dtype
        assert rel_err(out, weighted_average(b.to(dtype).to(F64), w)) < 1e-2


@PROPS
@given(problems())
def test_ffa_lora_is_exact(p: dict) -> None:
    a, b = client_factors(p)
    a_shared = a[:1].expand_as(a)
    w = normalize_weights(p["counts"])
    product = weighted_average(b, w) @ a_shared[0]
    assert rel_err(product, dense_ideal(a_shared, b, w)) < 1e-12


# ---------------------------------------------------------------- FLoRA


@PROPS
@given(problems(), st.data())
def test_flora_stack_and_merge(p: dict, data: st.DataObject) -> None:
    k, layers, d_out, d_in = len(p["counts"]), p["layers"], p["d_out"], p["d_in"]
    ranks = data.draw(st.lists(st.integers(1, 6), min_size=k, max_size=k))
    scalings = data.draw(st.lists(st.floats(0.1, 4.0), min_size=k, max_size=k))
    g = torch.Generator().manual_seed(p["seed"])
    a_list = [torch.randn(layers, r, d_in, generator=g, dtype=F64) for r in ranks]
    b_list = [torch.randn(layers, d_out, r, generator=g, dtype=F64) for r in ranks]
    w = normalize_weights(p["counts"])
    ref = sum(w[i] * scalings[i] * b_list[i] @ a_list[i] for i in range(k))

    a_stack, b_stack = flora_stack(a_list, b_list, w, scalings)
    assert a_stack.shape == (layers, sum(ranks), d_in) and b_stack.shape == (
        layers,
        d_out,
        sum(ranks),
    )
    assert rel_err(b_stack @ a_stack, ref) < 1e-12

    base = torch.randn(layers, d_out, d_in, generator=g)
    expected = base.to(F64) + ref
    weight = base.clone()
    ptr = weight.data_ptr()
    out = merge_into_base_(weight, b_stack.float(), a_stack.float())
    assert out is weight and weight.data_ptr() == ptr
    assert rel_err(weight, expected) < 1e-5
    weight_2d = base[0].clone()
    ptr = weight_2d.data_ptr()
    merge_into_base_(weight_2d, b_stack[0], a_stack[0])
    assert weight_2d.data_ptr() == ptr and rel_err(weight_2d, expected[0]) < 1e-5


def test_merge_refuses_half_precision_base() -> None:
    with pytest.raises(TypeError):
        merge_into_base_(
            torch.zeros(4, 4, dtype=torch.bfloat16), torch.ones(4, 1), torch.ones(1, 4)
        )


# ---------------------------------------------------------------- FedSVD


def check_fedsvd_output(new_b: torch.Tensor, new_a: torch.Tensor, ref: torch.Tensor) -> None:
    """B A == ref, A's rows orthonormal, B's columns orthogonal with descending norms."""
    assert torch.isfinite(new_b).all() and torch.isfinite(new_a).all()
    if ref.norm() > 0:
        assert rel_err(new_b @ new_a, ref) < 1e-5
    else:
        assert new_b.abs().max() == 0
    assert orthonormality_error(new_a) < 1e-5
    gram = (new_b.mT @ new_b).to(F64)
    norms_sq = gram.diagonal(dim1=-2, dim2=-1)
    off = gram - torch.diag_embed(norms_sq)
    assert off.abs().max() <= 1e-5 * max(norms_sq.max().item(), 1e-30)
    assert (norms_sq[..., :-1] >= norms_sq[..., 1:] * (1 - 1e-5) - 1e-12).all()


@PROPS
@given(problems())
def test_fedsvd_thin_refactorisation(p: dict) -> None:
    a, b = client_factors(p, torch.float32)
    w = normalize_weights(p["counts"])
    b_bar, a0 = weighted_average(b, w), a[0]
    new_b, new_a = fedsvd_refactor(b_bar, a0)
    assert new_b.dtype == new_a.dtype == torch.float32
    check_fedsvd_output(new_b, new_a, b_bar.to(F64) @ a0.to(F64))

    # Next round: A now has orthonormal rows, so the SVD of B_bar alone must give the same result.
    b_next = b_bar + 0.5 * torch.randn_like(b_bar)
    fast_b, fast_a = fedsvd_refactor(b_next, new_a, a_orthonormal=True)
    gen_b, gen_a = fedsvd_refactor(b_next, new_a)
    ref = b_next.to(F64) @ new_a.to(F64)
    check_fedsvd_output(fast_b, fast_a, ref)
    assert rel_err(fast_b @ fast_a, gen_b.to(F64) @ gen_a.to(F64)) < 1e-5
    assert torch.allclose(fast_b.norm(dim=-2), gen_b.norm(dim=-2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("a_orthonormal", [False, True])
def test_fedsvd_rank_deficient_b(dtype: torch.dtype, a_orthonormal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    layers, d_out, d_in, r = 3, 20, 12, 4
    a = torch.randn(layers, r, d_in, generator=g, dtype=F64)
    if a_orthonormal:
        a = torch.linalg.qr(a.mT).Q.mT
    a = a.to(dtype)
    zero = torch.zeros(layers, d_out, r, dtype=dtype)  # round 0: B = 0
    new_b, new_a = fedsvd_refactor(zero, a, a_orthonormal=a_orthonormal)
    check_fedsvd_output(new_b, new_a, torch.zeros(layers, d_out, d_in, dtype=F64))
    rank_one = torch.randn(layers, d_out, 1, generator=g) @ torch.randn(layers, 1, r, generator=g)
    new_b, new_a = fedsvd_refactor(rank_one.to(dtype), a, a_orthonormal=a_orthonormal)
    check_fedsvd_output(new_b, new_a, rank_one.to(F64) @ a.to(F64))
    assert new_b[..., 1:].norm() < 1e-5 * new_b.norm()


# ---------------------------------------------------------------- LoRA-FAIR


log_scales = st.floats(-6.0, 3.0).map(lambda e: 10.0**e)


@PROPS
@given(problems())
def test_lora_fair_factored_loss_matches_dense(p: dict) -> None:
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    lam = 0.01
    a_bar, b_prime, info = lora_fair_residual(a, b, w, lam=lam, max_iter=30, tol=0.0)
    x, _, b_bar = dense_fair_problem(a, b, w)
    assert info["iterations"] == 30 and not info["converged"]
    assert torch.allclose(a_bar, weighted_average(a, w), rtol=1e-12, atol=1e-14)
    initial = dense_fair_loss(x, b_bar, a_bar, b_bar, lam).item()
    final = dense_fair_loss(x, b_prime, a_bar, b_bar, lam).item()
    assert math.isclose(info["initial_loss"], initial, rel_tol=1e-9, abs_tol=1e-11)
    assert math.isclose(info["final_loss"], final, rel_tol=1e-9, abs_tol=1e-11)
    start = dense_fair_layer_loss(x, b_bar, a_bar, b_bar, lam)
    end = dense_fair_layer_loss(x, b_prime, a_bar, b_bar, lam)
    assert (end <= start + 1e-12).all()  # no layer ends above its start
    assert info["groups"] == [
        {
            "layers": p["layers"],
            "initial_loss": info["initial_loss"],
            "final_loss": info["final_loss"],
            "fallback_layers": info["fallback_layers"],
            "degenerate_layers": 0,
        }
    ]


@PROPS
@given(problems(), st.integers(1, 15))
def test_lora_fair_matches_the_dense_solver(p: dict, iters: int) -> None:
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    lr = 0.05
    _, one_step, _ = lora_fair_residual(a, b, w, lr=lr, max_iter=1, tol=0.0)
    x, a_bar, b_bar = dense_fair_problem(a, b, w)
    db = torch.zeros_like(b_bar, requires_grad=True)
    (grad,) = torch.autograd.grad(dense_fair_loss(x, b_bar + db, a_bar, b_bar, 0.01), db)
    step = lr * fair_unit(b_bar).square() * grad
    # the first step is taken unless it makes a layer worse (then that layer keeps B_bar)
    moved = (one_step - b_bar).abs().amax((-2, -1)) > 0
    assert torch.allclose((b_bar - one_step)[moved], step[moved], rtol=1e-7, atol=1e-9)
    _, b_prime, info = lora_fair_residual(a, b, w, lr=lr, max_iter=iters, tol=0.0)
    [ref], ref_iters = dense_fair_solve([(x, a_bar, b_bar)], lr=lr, max_iter=iters, tol=0.0)
    assert info["iterations"] == ref_iters == iters
    assert torch.allclose(b_prime, ref, rtol=1e-8, atol=1e-10 * b_bar.norm().item())


@PROPS
@given(problems(), log_scales, log_scales)
def test_lora_fair_is_scale_equivariant(p: dict, s: float, t: float) -> None:
    """B_k -> s B_k gives s B'; A_k -> t A_k changes nothing (s, t in [1e-6, 1e3])."""
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    a_bar, b_prime, info = lora_fair_residual(a, b, w, max_iter=200)
    a_s, b_s, info_s = lora_fair_residual(t * a, s * b, w, max_iter=200)
    assert rel_err(a_s, t * a_bar) < 1e-12
    assert rel_err(b_s, s * b_prime) < 1e-6
    assert info_s["iterations"] == info["iterations"]
    assert math.isclose(info_s["final_loss"], info["final_loss"], rel_tol=1e-6, abs_tol=1e-12)


@PROPS
@given(problems(), log_scales)
def test_lora_fair_shared_a_gives_the_ideal_update(p: dict, s: float) -> None:
    """With one A for every client FedAvg is exact, and LoRA-FAIR must return dW* itself."""
    a, b = client_factors(p)
    a = a[:1].expand_as(a).clone()
    b = s * b
    w = normalize_weights(p["counts"])
    a_bar, b_prime, info = lora_fair_residual(a, b, w)
    assert rel_err(b_prime @ a_bar, dense_ideal(a, b, w)) < 1e-6
    assert info["final_loss"] <= info["initial_loss"]


@settings(max_examples=10, deadline=None, database=None)  # a dense autograd solve per example
@given(problems(), problems(), log_scales, st.sampled_from([0.0, 1e-6, 1e-4]))
def test_lora_fair_groups_share_one_stopping_rule(p: dict, q: dict, s: float, tol: float) -> None:
    """Two layer shapes solved together: one stopping rule on the summed loss, best iterates."""
    q = {**q, "counts": p["counts"]}
    (a1, b1), (a2, b2) = client_factors(p), client_factors(q)
    b2 = s * b2  # the groups need not share a scale
    w = normalize_weights(p["counts"])
    results, info = lowrank.lora_fair_residual_groups(
        [(a1, b1), (a2, b2)], w, max_iter=150, tol=tol
    )
    dense = [dense_fair_problem(a1, b1, w), dense_fair_problem(a2, b2, w)]
    refs, ref_iters = dense_fair_solve(dense, max_iter=150, tol=tol)
    assert info["iterations"] == ref_iters
    for (a_bar, b_prime), ref, (x, _, b_bar) in zip(results, refs, dense):
        assert torch.allclose(b_prime, ref, rtol=1e-7, atol=1e-9 * b_bar.norm().item())
        start = dense_fair_layer_loss(x, b_bar, a_bar, b_bar, 0.01)
        end = dense_fair_layer_loss(x, b_prime, a_bar, b_bar, 0.01)
        assert (end <= start + 1e-12).all()
    assert [g["layers"] for g in info["groups"]] == [p["layers"], q["layers"]]
    assert math.isclose(
        info["final_loss"], sum(g["final_loss"] for g in info["groups"]), rel_tol=1e-12
    )
    assert info["converged"] == (
        info["iterations"] < 150 and info["last_loss"] - info["final_loss"] <= tol
    )


def test_lora_fair_early_stop() -> None:
    p = {"layers": 2, "d_out": 10, "d_in": 8, "rank": 3, "counts": [5, 9, 2], "seed": 3}
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    _, _, info = lora_fair_residual(a, b, w, lr=0.5, tol=1e-6, patience=5)
    assert info["converged"] and 5 <= info["iterations"] < 1000
    _, _, info = lora_fair_residual(a, b, w, max_iter=7, tol=0.0)
    assert info["iterations"] == 7 and not info["converged"]


def test_lora_fair_small_norms_no_longer_diverge() -> None:
    """The issue-16 case: d = 384, r = 8, K = 3, Kaiming A, B entries 1e-4 to 1e-3.

    The old solver (plain SGD on dB) gave ||B' A_bar|| / ||dW*|| of 3.5 to 320 here, its loss
    rose, and it still said converged. Now the ratio and the cosine are those at unit scale.
    """
    g = torch.Generator().manual_seed(1)
    d, r, k = 384, 8, 3
    w = normalize_weights([100, 250, 400])
    a0 = (torch.rand(1, r, d, generator=g, dtype=F64) * 2 - 1) / math.sqrt(d)
    a = a0 + 0.05 * (torch.rand(k, 1, r, d, generator=g, dtype=F64) * 2 - 1) / math.sqrt(d)
    b = torch.randn(k, 1, d, r, generator=g, dtype=F64)
    x = dense_ideal(a, b, w)
    a_bar, unit, info = lora_fair_residual(a, b, w)
    for scale in (1e-4, 1e-3, 1e-2):
        a_bar, b_prime, small = lora_fair_residual(a, scale * b, w)
        ratio = (b_prime @ a_bar).norm() / (scale * x).norm()
        assert 0.99 < ratio.item() < 1.01
        assert rel_err(b_prime, scale * unit) < 1e-9
        assert small["final_loss"] <= small["initial_loss"] and small["converged"]


def test_lora_fair_keeps_b_bar_when_no_step_helps() -> None:
    """A step too large for every layer: each layer keeps B_bar, said in fallback_layers."""
    p = {"layers": 3, "d_out": 10, "d_in": 8, "rank": 3, "counts": [5, 9, 2], "seed": 3}
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    b_bar = weighted_average(b, w)
    _, b_prime, info = lora_fair_residual(a, b, w, lam=0.0, lr=1e4, max_iter=20, tol=0.0)
    assert info["fallback_layers"] == 3 and info["final_loss"] == info["initial_loss"]
    assert torch.equal(b_prime, b_bar) and not info["converged"]


@settings(PROPS, max_examples=10)
@given(problems())
def test_lora_fair_huge_lambda_gives_fedavg(p: dict) -> None:
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    b_bar = weighted_average(b, w)
    # lr * lam = 0.1: plain SGD is stable and ||dB|| stays below ||grad_cos|| / (2 lam).
    _, b_prime, _ = lora_fair_residual(a, b, w, lam=1e6, lr=1e-7, max_iter=50, tol=0.0)
    assert (b_prime - b_bar).norm() <= 1e-5 * b_bar.norm()


def test_lora_fair_rejects_divergent_step() -> None:
    a, b = client_factors({"layers": 1, "d_out": 4, "d_in": 4, "rank": 2, "counts": [1], "seed": 0})
    with pytest.raises(ValueError, match="lr"):
        lora_fair_residual(a, b, normalize_weights([1]), lam=1e6)


def test_lora_fair_zero_b_round_zero() -> None:
    p = {"layers": 3, "d_out": 10, "d_in": 8, "rank": 3, "counts": [5, 9, 2], "seed": 1}
    a, b = client_factors(p, torch.float32)
    w = normalize_weights(p["counts"])
    a_bar, b_prime, info = lora_fair_residual(a, torch.zeros_like(b), w)
    assert b_prime.abs().max() == 0 and torch.isfinite(a_bar).all()
    assert math.isfinite(info["initial_loss"]) and math.isfinite(info["final_loss"])
    assert info["degenerate_layers"] == 3 and info["fallback_layers"] == 0
    b = b.clone()
    b[:, 1] = 0  # only layer 1 is degenerate: it stays at B_bar, the others still move
    _, b_prime, info = lora_fair_residual(a, b, w, max_iter=20, tol=0.0)
    assert torch.isfinite(b_prime).all() and b_prime[1].abs().max() == 0
    assert not torch.equal(b_prime[0], weighted_average(b, w)[0])
    assert info["degenerate_layers"] == 1
    _, b_cf = lora_fair_closed_form(a, torch.zeros_like(b), w)
    assert b_cf.abs().max() == 0


@PROPS
@given(problems(), st.sampled_from([1e-3, 0.01, 1.0]))
def test_lora_fair_closed_form_is_ridge_least_squares(p: dict, lam: float) -> None:
    a, b = client_factors(p)
    w = normalize_weights(p["counts"])
    a_bar, b_prime = lora_fair_closed_form(a, b, w, lam=lam)
    x, b_bar = dense_ideal(a, b, w), weighted_average(b, w)
    # min ||X - B' A||^2 + lam ||B' - B_bar||^2 as an augmented dense least-squares problem in B'^T
    eye = math.sqrt(lam) * torch.eye(p["rank"], dtype=F64).expand(p["layers"], -1, -1)
    lhs = torch.cat([a_bar.mT, eye], dim=-2)
    rhs = torch.cat([x.mT, math.sqrt(lam) * b_bar.mT], dim=-2)
    ref = torch.linalg.lstsq(lhs, rhs).solution.mT
    assert torch.allclose(b_prime, ref, rtol=1e-6, atol=1e-8)


_MEMORY_PROBE = textwrap.dedent(
    """
    import torch
    from fedpeft.lowrank import lora_fair_residual, normalize_weights

    def peak() -> int:  # VmHWM, this process only (ru_maxrss keeps the parent's peak over exec)
        with open("/proc/self/status") as status:
            return next(int(x.split()[1]) * 1024 for x in status if x.startswith("VmHWM:"))

    k, r, d = 10, 16, 4096
    g = torch.Generator().manual_seed(0)
    w = normalize_weights(list(range(1, k + 1)))
    small = (torch.randn(k, 1, r, 64, generator=g), torch.randn(k, 1, 64, r, generator=g))
    lora_fair_residual(*small, w, max_iter=5)  # warm-up: BLAS and allocator set-up not counted
    a = torch.randn(k, 1, r, d, generator=g) / d**0.5
    b = torch.randn(k, 1, d, r, generator=g)
    base = peak()
    _, b_prime, info = lora_fair_residual(a, b, w, max_iter=100, tol=0.0)
    used = peak() - base
    dense = torch.ones(d, d)  # control: one dense float32 layer must register
    control = peak() - base - used
    print(used, control, a.nbytes + b.nbytes, info["iterations"], bool(b_prime.isfinite().all()))
    """
)


def test_lora_fair_peak_memory_never_dense() -> None:
    """One 4096 x 4096 layer, K = 10, r = 16: peak RSS growth stays far below one dense layer.

    A fixed glibc mmap threshold makes freed blocks leave the RSS, so its peak tracks live memory.
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc for the peak RSS")
    root = Path(lowrank.__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    used, control, factors, iterations, finite = done.stdout.split()
    dense_bytes = 4096 * 4096 * 4
    assert finite == "True" and int(iterations) == 100
    assert int(control) > 0.75 * dense_bytes, f"probe missed a dense matrix: {done.stdout}"
    assert int(used) < dense_bytes / 4, f"grew {int(used) / 2**20:.1f} MiB, factors {factors} B"


# ---------------------------------------------------------------- Fed-SB


@PROPS
@given(problems())
def test_fed_sb_is_exact(p: dict) -> None:
    g = torch.Generator().manual_seed(p["seed"])
    layers, r = p["layers"], p["rank"]
    b, a, r0 = orthonormal_init(layers, p["d_out"], p["d_in"], r, g, dtype=F64)
    assert r0.shape == (layers, r, r) and r0.abs().max() == 0
    rs = torch.randn(len(p["counts"]), layers, r, r, generator=g, dtype=F64)
    w = normalize_weights(p["counts"])
    ref = sum(w[k] * b @ rs[k] @ a for k in range(len(w)))
    assert rel_err(b @ weighted_average(rs, w) @ a, ref) < 1e-12


def test_orthonormal_init_per_layer_draws() -> None:
    layers, d_out, d_in, r = 4, 32, 24, 8
    b, a, r0 = orthonormal_init(layers, d_out, d_in, r, torch.Generator().manual_seed(7))
    assert (
        b.shape == (layers, d_out, r) and a.shape == (layers, r, d_in) and b.dtype == torch.float32
    )
    assert orthonormality_error(b.mT) < 1e-5 and orthonormality_error(a) < 1e-5
    assert torch.equal(r0, torch.zeros(layers, r, r))
    b2, a2, _ = orthonormal_init(layers, d_out, d_in, r, torch.Generator().manual_seed(7))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    for i in range(layers):
        for j in range(i):
            assert (a[i] - a[j]).abs().max() > 0.1 and (b[i] - b[j]).abs().max() > 0.1
    b3, a3, _ = orthonormal_init(layers, d_out, d_in, r, torch.Generator().manual_seed(8))
    assert not torch.allclose(a, a3) and not torch.allclose(b, b3)


def best_rank_error(x: torch.Tensor, rank: int) -> float:
    return torch.linalg.svdvals(x.to(F64))[rank:].square().sum().sqrt().item()


@PROPS
@given(st.integers(2, 14), st.integers(2, 14), st.integers(0, 2**31 - 1), st.data())
def test_lora_sb_init_small_is_best_rank_r(d_out: int, d_in: int, seed: int, data) -> None:
    rank = data.draw(st.integers(1, min(d_out, d_in)))
    grad = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))
    lr = 1e-3
    b, r, a = lora_sb_init(grad, rank, lr)
    dw1 = -lr * torch.sign(grad)
    assert b.shape == (d_out, rank) and r.shape == (rank, rank) and a.shape == (rank, d_in)
    assert orthonormality_error(b.mT) < 1e-5 and orthonormality_error(a) < 1e-5
    s = r.diagonal()
    assert torch.equal(r, torch.diag(s)) and (s >= 0).all() and (s[:-1] >= s[1:]).all()
    ref_s = torch.linalg.svdvals(dw1.to(F64))[:rank]
    assert torch.allclose(s.to(F64), ref_s, rtol=1e-5, atol=1e-9)
    err = (dw1.to(F64) - (b @ r @ a).to(F64)).norm().item()
    assert err <= best_rank_error(dw1, rank) * (1 + 1e-5) + 1e-7


def test_lora_sb_init_randomised_path() -> None:
    g = torch.Generator().manual_seed(0)
    d_out, d_in, rank, lr = 300, 200, 4, 5e-4
    grad = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    grad += 0.3 * torch.randn(d_out, d_in, generator=g)
    b, r, a = lora_sb_init(grad, rank, lr, torch.Generator().manual_seed(1))
    dw1 = -lr * torch.sign(grad)
    err = (dw1.to(F64) - (b @ r @ a).to(F64)).norm().item()
    assert err <= best_rank_error(dw1, rank) * 1.001
    assert orthonormality_error(b.mT) < 1e-5 and orthonormality_error(a) < 1e-5
    again = lora_sb_init(grad, rank, lr, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip((b, r, a), again, strict=True))


# --- FedRot-LoRA: orthogonal Procrustes alignment -------------------------------------------------


def _rotation(layers: int, r: int, seed: int, det: float = 1.0) -> torch.Tensor:
    """Haar-random orthogonal (layers, r, r) in float64 with the given determinant sign."""
    g = torch.Generator().manual_seed(seed)
    q, upper = torch.linalg.qr(torch.randn(layers, r, r, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(upper, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(q) * det < 0
    q[flip, :, -1] = -q[flip, :, -1]
    return q


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 4),
    r=st.integers(1, 8),
    d_in=st.integers(8, 40),
    d_out=st.integers(8, 40),
    log_scale=st.floats(-6, 3),
    strength=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    factor=st.sampled_from(["A", "B"]),
    seed=st.integers(0, 10_000),
)
def test_fedrot_rotation_is_orthogonal_and_keeps_every_product(
    layers, r, d_in, d_out, log_scale, strength, factor, seed
):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    a, a_ref = (
        scale * torch.randn(layers, r, d_in, generator=g, dtype=torch.float64) for _ in "12"
    )
    b, b_ref = (
        scale * torch.randn(layers, d_out, r, generator=g, dtype=torch.float64) for _ in "12"
    )
    new_a, new_b = lowrank.fedrot_align(a, b, a_ref, b_ref, factor, strength)
    assert torch.allclose(new_b @ new_a, b @ a, rtol=1e-10, atol=1e-12 * scale**2)
    ref = a_ref if factor == "A" else b_ref
    m = a @ ref.mT if factor == "A" else b.mT @ ref
    rot = lowrank.procrustes_rotation(m, strength)
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(rot.mT @ rot, eye.expand_as(rot), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(layers, dtype=torch.float64))
    if strength == 0.0:
        assert torch.allclose(rot, eye.expand_as(rot), atol=1e-12)


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e3])
def test_fedrot_hard_fit_undoes_a_rotation_exactly_and_beats_every_other(factor, scale):
    """Clients that differ from the reference only by a rotation are brought back to it exactly
    (FedAvg's cross terms vanish); on any pair, R* scores no worse than 200 random rotations."""
    layers, r, d_in, d_out = 3, 6, 24, 20
    g = torch.Generator().manual_seed(7)
    a_ref = scale * torch.randn(layers, r, d_in, generator=g, dtype=torch.float64)
    b_ref = scale * torch.randn(layers, d_out, r, generator=g, dtype=torch.float64)
    q = _rotation(layers, r, seed=3)
    new_a, new_b = lowrank.fedrot_align(q.mT @ a_ref, b_ref @ q, a_ref, b_ref, factor, 1.0)
    assert torch.allclose(new_a, a_ref, rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(new_b, b_ref, rtol=1e-10, atol=1e-12 * scale)
    a = scale * torch.randn(layers, r, d_in, generator=g, dtype=torch.float64)
    b = scale * torch.randn(layers, d_out, r, generator=g, dtype=torch.float64)
    m = a @ a_ref.mT if factor == "A" else b.mT @ b_ref

    def misfit(rot):
        if factor == "A":
            return torch.linalg.norm(rot.mT @ a - a_ref, dim=(-2, -1))
        return torch.linalg.norm(b @ rot - b_ref, dim=(-2, -1))

    best = misfit(lowrank.procrustes_rotation(m, 1.0, allow_reflection=True))
    for seed in range(200):
        other = _rotation(layers, r, seed=100 + seed, det=1.0 if seed % 2 else -1.0)
        assert torch.all(best <= misfit(other) * (1 + 1e-12))


def test_fedrot_reflections_are_kept_out_unless_allowed():
    """A client that is a reflection of the reference: with reflections allowed the fit undoes it;
    by default R stays in SO(r), and the halfway soft fit is still a proper rotation."""
    layers, r = 2, 4
    g = torch.Generator().manual_seed(1)
    a_ref = torch.randn(layers, r, 12, generator=g, dtype=torch.float64)
    b_ref = torch.randn(layers, 10, r, generator=g, dtype=torch.float64)
    q = _rotation(layers, r, seed=5, det=-1.0)
    a, b = q.mT @ a_ref, b_ref @ q
    new_a, _ = lowrank.fedrot_align(a, b, a_ref, b_ref, "A", 1.0, allow_reflection=True)
    assert torch.allclose(new_a, a_ref, atol=1e-12)
    for strength in (0.5, 1.0):
        rot = lowrank.procrustes_rotation(a @ a_ref.mT, strength)
        assert torch.all(torch.isfinite(rot))
        assert torch.allclose(torch.linalg.det(rot), torch.ones(layers, dtype=torch.float64))


def test_fedrot_float32_replies_are_fitted_in_float64_and_returned_in_float32():
    g = torch.Generator().manual_seed(2)
    a, a_ref = (torch.randn(3, 8, 64, generator=g) for _ in "12")
    b, b_ref = (torch.randn(3, 48, 8, generator=g) for _ in "12")
    new_a, new_b = lowrank.fedrot_align(a, b, a_ref, b_ref, "B", 0.5)
    assert new_a.dtype == new_b.dtype == torch.float32
    dense = b.double() @ a.double()
    rel = torch.linalg.norm(new_b.double() @ new_a.double() - dense) / torch.linalg.norm(dense)
    assert rel < 1e-6


def test_fedrot_bad_input_is_refused():
    with pytest.raises(ValueError, match="strength must be in"):
        lowrank.procrustes_rotation(torch.eye(3).expand(1, 3, 3), 1.5)
    with pytest.raises(ValueError, match="factor must be"):
        lowrank.fedrot_align(torch.zeros(1, 2, 4), torch.zeros(1, 3, 2), torch.zeros(1, 2, 4),
                             torch.zeros(1, 3, 2), "C")  # fmt: skip


# --- FedMomentum: top-r part as the next LoRA, the tail into the base --------------------------


def _clients(k, layers, r, d_in, d_out, scale, seed):
    g = torch.Generator().manual_seed(seed)
    a = [scale * torch.randn(layers, r, d_in, generator=g, dtype=torch.float64) for _ in range(k)]
    b = [scale * torch.randn(layers, d_out, r, generator=g, dtype=torch.float64) for _ in range(k)]
    w = lowrank.normalize_weights(torch.randint(10, 100, (k,), generator=g))
    return a, b, w


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e2])
@pytest.mark.parametrize(
    ("k", "r", "d_in", "d_out"), [(3, 4, 20, 16), (5, 2, 12, 30), (2, 8, 40, 40)]
)
def test_fedmomentum_keeps_the_best_rank_r_part_and_the_tail_exactly(scale, k, r, d_in, d_out):
    """Against the dense float64 aggregate: s B A is its truncated SVD (Eckart-Young), and with
    energy 1 the LoRA plus the residual components reproduce it exactly."""
    layers, s = 3, 2.0
    a, b, w = _clients(k, layers, r, d_in, d_out, scale, seed=k * 100 + r)
    dense = sum(float(w[i]) * s * b[i] @ a[i] for i in range(k))
    us, vh = lowrank.stacked_svd(*lowrank.flora_stack(a, b, w, [s] * k))
    new_a, new_b, r_eff, dead = lowrank.fedmomentum_split(us, vh, r, s, energy=1.0)
    u, sig, vt = torch.linalg.svd(dense)
    best = u[..., :r] * sig[..., None, :r] @ vt[..., :r, :]
    norm = torch.linalg.norm(dense, dim=(-2, -1), keepdim=True)
    assert torch.all(
        torch.linalg.norm(s * new_b @ new_a - best, dim=(-2, -1)) <= 1e-10 * norm[..., 0, 0]
    )
    assert not bool(dead.any())
    for layer in range(layers):
        tail = int(r_eff[layer])
        assert tail == min(k * r, d_in, d_out)  # energy 1: every nonzero component
        whole = s * new_b[layer] @ new_a[layer] + us[layer, :, r:tail] @ vh[layer, r:tail]
        assert torch.allclose(whole, dense[layer], rtol=0, atol=1e-10 * float(norm[layer]))
    # the split is balanced: B's column norms equal A's row norms, sqrt(sigma_i / s)
    assert torch.allclose(new_b.norm(dim=-2), new_a.norm(dim=-1), rtol=1e-10)
    assert torch.allclose(new_a.norm(dim=-1), torch.sqrt(sig[..., :r] / s), rtol=1e-8)


def test_fedmomentum_energy_drops_only_the_smallest_components():
    """With energy < 1, r_eff is the fewest components holding that share of ||dW||_F^2."""
    sig = torch.tensor([[8.0, 4.0, 2.0, 1.0, 0.5, 0.0]], dtype=torch.float64)
    us = torch.diag_embed(sig)  # U = I: columns of U S have norms sig
    vh = torch.eye(6, dtype=torch.float64).unsqueeze(0)
    power = sig.square().cumsum(-1) / sig.square().sum()
    for energy, expected in [(1.0, 5), (float(power[0, 3]), 4), (0.9, 2), (0.5, 1)]:
        *_, r_eff, _ = lowrank.fedmomentum_split(us, vh, 2, 1.0, energy)
        assert int(r_eff[0]) == expected, (energy, int(r_eff[0]))


def test_fedmomentum_marks_dead_slots_with_zero_factors():
    """A layer whose aggregate has rank < r: the empty slots have zero A rows and B columns."""
    a, b, w = _clients(1, 2, 2, 10, 10, 1.0, seed=3)  # one client of rank 2: aggregate rank 2
    us, vh = lowrank.stacked_svd(*lowrank.flora_stack(a, b, w, [1.0]))
    us = torch.nn.functional.pad(us, (0, 2))  # as if q = 4 with two zero components
    vh = torch.cat([vh, torch.zeros(2, 2, 10, dtype=torch.float64)], dim=-2)
    new_a, new_b, r_eff, dead = lowrank.fedmomentum_split(us, vh, 4, 1.0, 0.9999)
    assert dead[:, 2:].all() and not dead[:, :2].any()
    assert torch.all(new_a[:, 2:] == 0) and torch.all(new_b[..., 2:] == 0)
    zero = lowrank.fedmomentum_split(torch.zeros(1, 5, 3), torch.zeros(1, 3, 4), 2, 1.0, 0.9)
    assert int(zero[2][0]) == 0 and zero[3].all() and torch.all(zero[0] == 0)
