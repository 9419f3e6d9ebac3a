"""Time one round's server-side aggregation per method against the naive dense form, in one run.

    python benchmarks/aggregation.py                       # cpu preset: 8 layers of 1024 x 1024
    python benchmarks/aggregation.py --preset llama7b --device cuda --dense-layers 4

For every method it prints the fast (factored) time, the dense time, the speed-up and the largest
per-layer relative error between the two results' d_out x d_in updates. Times are the median of
--repeats runs after a warm-up. The dense baselines are the naive forms: the sum of the per-client
products (fedavg's ideal dW*, ffa_lora, flora, fed_sb, fedex_lora's exact average), forming
B_bar A and a full SVD as the official FedSVD code does (FlexLoRA: the dense dW and its full SVD,
truncated to rank r, as its official code does), LoRA-FAIR's SGD on the dense dW* and
dense products (autograd), for the same fixed number of iterations as the factored solver, and
HetLoRA's sparsity norms ||B_k A_k||_F from the dense products (its averages are FedAvg's; the
row's error is that of the K x L table of norms), RoLoRA's A round (the average of A under the
kept B against the dense sum p_k B A_k; its B rounds are FFA-LoRA's row) and FedSA-LoRA's average
of A alone against a loop over layers and clients (the official aggregator's; there is no product
to compare, each client keeps its own B), and FedRot-LoRA's A round (every reply rotated towards the
global pair, then averaged) against the official per-client, per-layer loop of r x r fits, and
FedMomentum's top-r pair against the dense dW and its full SVD (the re-implementation's form).
With --dense-layers N the dense forms run on the first N layers only and their time is
extrapolated linearly to all layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

try:
    from fedpeft import lowrank
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedpeft import lowrank

Tensor = torch.Tensor
PRESETS = {
    "cpu": {"layers": 8, "dim": 1024, "rank": 16, "clients": 10, "dense_layers": None},
    "llama7b": {"layers": 128, "dim": 4096, "rank": 16, "clients": 10, "dense_layers": 4},
}
TARGETS = {"fedsvd": 100.0, "lora_fair": 10.0}
COLUMNS = ("method", "fast", "dense", "speed-up", "max rel err", "target", "result", "note")
FAIR_LAM, FAIR_LR, FLORA_SCALING, ROT_LAMBDA = 0.01, 0.01, 2.0, 0.5


@dataclass
class Method:
    """A method's fast aggregation, its dense baseline on the first n layers, and their updates."""

    name: str
    fast: Callable[[], Any]
    dense: Callable[[int], Any]
    fast_update: Callable[[Any, int], Tensor]
    dense_update: Callable[[Any], Tensor]
    note: str


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--layers", type=int, help="override the preset's layer count L")
    parser.add_argument("--dim", type=int, help="override d_out = d_in")
    parser.add_argument("--rank", type=int, help="override the LoRA rank r")
    parser.add_argument("--clients", type=int, help="override the clients per round K")
    parser.add_argument("--dense-layers", type=int, help="time the dense forms on N layers only")
    parser.add_argument("--fair-iters", type=int, default=50, help="LoRA-FAIR steps, both forms")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dense-budget", type=float, default=10.0, help="no more dense repeats after this many s"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dense_layers = min(args.dense_layers or args.layers, args.layers)
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float = float("inf")
) -> tuple[float, Any]:
    """Median wall time of fn over `repeats` calls (fewer once budget_s is spent), last result."""
    times, out = [], None
    while len(times) < repeats and (not times or sum(times) < budget_s):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def build_methods(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[list[Method], Callable[[], Any]]:
    """Random client factors for one round, the six methods' fast and dense forms, and a
    LoRA-FAIR run with the paper's stopping rule."""
    k, n_layers, d, r = args.clients, args.layers, args.dim, args.rank
    gen = torch.Generator(device).manual_seed(args.seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    w = lowrank.normalize_weights(torch.randint(50, 500, (k,), generator=gen, device=device))
    pw = [float(x) for x in w]
    a0, b0 = randn(n_layers, r, d, scale=d**-0.5), randn(n_layers, d, r, scale=0.01)
    a = a0 + randn(k, n_layers, r, d, scale=0.3 * d**-0.5)  # warm-started clients drift apart
    b = b0 + randn(k, n_layers, d, r, scale=0.01)
    sb_b, sb_a, _ = lowrank.orthonormal_init(n_layers, d, d, r, gen, dtype=dtype)
    sb_r = randn(k, n_layers, r, r, scale=0.01)

    def dense_sum(n: int, bs: Callable[[int], Tensor], as_: Callable[[int], Tensor], s=1.0):
        """Naive sum_k p_k s B_k A_k on the first n layers, one dense product per client."""
        out = torch.zeros(n, d, d, device=device, dtype=dtype)
        for i in range(k):
            out.baddbmm_(bs(i)[:n], as_(i)[:n], alpha=pw[i] * s)
        return out

    def ideal(n: int) -> Tensor:
        return dense_sum(n, lambda i: b[i], lambda i: a[i])

    def fedsvd_fast() -> tuple[Tensor, Tensor]:
        return lowrank.fedsvd_refactor(lowrank.weighted_average(b, w), a0)

    def fedsvd_dense(n: int) -> tuple[Tensor, Tensor]:
        u, s, vh = torch.linalg.svd(lowrank.weighted_average(b[:, :n], w) @ a0[:n])
        return u[..., :r] * s[..., None, :r], vh[..., :r, :]

    def fair_dense(n: int) -> tuple[Tensor, Tensor]:
        """The same objective and plain SGD, on the dense dW* and dense products, by autograd.

        Per layer: [1 - cos] + lam ||dB||^2 / ||B_bar||^2, stepped as SGD on dB / ||B_bar||, i.e.
        dB -= lr ||B_bar||^2 grad (the units of lowrank.lora_fair_residual_groups).
        """
        x = ideal(n).flatten(1)
        a_bar = lowrank.weighted_average(a[:, :n], w)
        b_bar = lowrank.weighted_average(b[:, :n], w)
        b_sq = b_bar.square().sum((-2, -1))
        db = torch.zeros_like(b_bar, requires_grad=True)
        for _ in range(args.fair_iters):
            cos = F.cosine_similarity(x, ((b_bar + db) @ a_bar).flatten(1), dim=1)
            loss = ((1 - cos) + FAIR_LAM * db.square().sum((-2, -1)) / b_sq).sum()
            loss.backward()
            loss.item()  # the early-stop check reads the loss, as in the factored loop
            with torch.no_grad():
                db -= FAIR_LR * b_sq[:, None, None] * db.grad
            db.grad = None
        return a_bar, (b_bar + db).detach()

    def fedex_update(out: tuple, n: int) -> Tensor:
        """s B_bar A_bar + B_R A_R: the global effective update, on the first n layers."""
        a_bar, b_bar, (a_r, b_r) = out
        return FLORA_SCALING * b_bar[:n] @ a_bar[:n] + b_r[:n] @ a_r[:n]

    def flex_fast() -> tuple[Tensor, Tensor]:
        a_st, b_st = lowrank.flora_stack(a.unbind(0), b.unbind(0), w, [FLORA_SCALING] * k)
        us, vh = lowrank.stacked_svd(a_st, b_st)
        return lowrank.flexlora_truncate(us, vh, r, FLORA_SCALING)

    def flex_dense(n: int) -> tuple[Tensor, Tensor]:
        """The official form: the dense dW, a full SVD, truncated to rank r."""
        u, s, vh = torch.linalg.svd(dense_sum(n, lambda i: b[i], lambda i: a[i], FLORA_SCALING))
        return vh[..., :r, :], u[..., :r] * s[..., None, :r] / FLORA_SCALING

    def rot_fast() -> tuple[Tensor, Tensor]:
        """FedRot-LoRA's A round: every reply rotated in one batched call, then averaged."""
        ra, rb = lowrank.fedrot_align(
            a.flatten(0, 1),
            b.flatten(0, 1),
            a0.expand_as(a).flatten(0, 1),
            b0.expand_as(b).flatten(0, 1),
            "A",
            ROT_LAMBDA,
        )
        ra, rb = ra.unflatten(0, (k, n_layers)), rb.unflatten(0, (k, n_layers))
        return lowrank.weighted_average(ra, w), lowrank.weighted_average(rb, w)

    def rot_dense(n: int) -> tuple[Tensor, Tensor]:
        """The official form: a loop over clients and layers, one r x r fit and rotation each."""
        eye = torch.eye(r, dtype=torch.float64, device=device)
        sum_a = torch.zeros(n, r, d, device=device, dtype=dtype)
        sum_b = torch.zeros(n, d, r, device=device, dtype=dtype)
        for i in range(k):
            for layer in range(n):
                u, _, vh = torch.linalg.svd(a[i, layer].double() @ a0[layer].double().T)
                if torch.linalg.det(u @ vh) < 0:
                    vh[-1] = -vh[-1]
                ux, _, vxh = torch.linalg.svd((1 - ROT_LAMBDA) * eye + ROT_LAMBDA * (u @ vh))
                rot = (ux @ vxh).to(dtype)
                sum_a[layer] += pw[i] * (rot.T @ a[i, layer])
                sum_b[layer] += pw[i] * (b[i, layer] @ rot)
        return sum_a, sum_b

    def momentum_fast() -> tuple[Tensor, Tensor]:
        """FedMomentum: stack, thin SVD, the top-r pair split evenly (the tail's extent beside)."""
        a_st, b_st = lowrank.flora_stack(a.unbind(0), b.unbind(0), w, [FLORA_SCALING] * k)
        us, vh = lowrank.stacked_svd(a_st, b_st)
        new_a, new_b, _, _ = lowrank.fedmomentum_split(us, vh, r, FLORA_SCALING, 0.9999)
        return new_a, new_b

    def momentum_dense(n: int) -> tuple[Tensor, Tensor]:
        """The re-implementation's form: the dense dW and its SVD, the top r split evenly."""
        u, sig, vh = torch.linalg.svd(dense_sum(n, lambda i: b[i], lambda i: a[i], FLORA_SCALING))
        root = torch.sqrt(sig[..., :r] / FLORA_SCALING)
        return root.unsqueeze(-1) * vh[..., :r, :], u[..., :r] * root.unsqueeze(-2)

    def fair_fast() -> tuple[Tensor, Tensor, dict]:
        return lowrank.lora_fair_residual(a, b, w, FAIR_LAM, FAIR_LR, args.fair_iters, tol=0.0)

    methods = [
        Method(
            "fedavg",
            lambda: (lowrank.weighted_average(a, w), lowrank.weighted_average(b, w)),
            ideal,
            lambda out, n: out[1][:n] @ out[0][:n],
            lambda out: out,
            "dense = ideal dW*; err = FedAvg's inexactness (by design)",
        ),
        Method(
            "ffa_lora",
            lambda: lowrank.weighted_average(b, w),
            lambda n: dense_sum(n, lambda i: b[i], lambda i: a0),
            lambda out, n: out[:n] @ a0[:n],
            lambda out: out,
            "dense = sum p_k B_k A",
        ),
        Method(
            "flora",
            lambda: lowrank.flora_stack(a.unbind(0), b.unbind(0), w, [FLORA_SCALING] * k),
            lambda n: dense_sum(n, lambda i: b[i], lambda i: a[i], FLORA_SCALING),
            lambda out, n: out[1][:n] @ out[0][:n],
            lambda out: out,
            "stack vs dense sum p_k s B_k A_k",
        ),
        Method(
            "fedsvd",
            fedsvd_fast,
            fedsvd_dense,
            lambda out, n: out[0][:n] @ out[1][:n],
            lambda out: out[0] @ out[1],
            "thin QR + r x r SVD vs B_bar A + full SVD",
        ),
        Method(
            "lora_fair",
            fair_fast,
            fair_dense,
            lambda out, n: out[1][:n] @ out[0][:n],
            lambda out: out[1] @ out[0],
            f"{args.fair_iters} SGD steps in both forms",
        ),
        Method(
            "fedex_lora",
            lambda: lowrank.fedex_aggregate(a, b, w, FLORA_SCALING),
            lambda n: dense_sum(n, lambda i: b[i], lambda i: a[i], FLORA_SCALING),
            fedex_update,
            lambda out: out,
            "s B_bar A_bar + residual factors vs dense sum p_k s B_k A_k",
        ),
        Method(
            "flexlora",
            flex_fast,
            flex_dense,
            lambda out, n: FLORA_SCALING * out[1][:n] @ out[0][:n],
            lambda out: FLORA_SCALING * out[1] @ out[0],
            "stack + thin SVD, rank r vs dense dW + full SVD",
        ),
        Method(
            "rolora",
            lambda: lowrank.weighted_average(a, w),
            lambda n: dense_sum(n, lambda i: b0, lambda i: a[i]),
            lambda out, n: b0[:n] @ out[:n],
            lambda out: out,
            "A round: average of A under the kept B vs dense sum p_k B A_k (B rounds: ffa_lora)",
        ),
        Method(
            "fedsa_lora",
            lambda: lowrank.weighted_average(a, w),
            lambda n: torch.stack(
                [sum(pw[i] * a[i, layer] for i in range(k)) for layer in range(n)]
            ),
            lambda out, n: out[:n],
            lambda out: out,
            "average of A only vs a per-layer, per-client loop (the official aggregator's)",
        ),
        Method(
            "hetlora",
            lambda: lowrank.lora_product_norms(a, b),
            lambda n: torch.stack([(b[i, :n] @ a[i, :n]).norm(dim=(-2, -1)) for i in range(k)]),
            lambda out, n: out[:, :n],
            lambda out: out,
            "||B_k A_k||_F per client and layer: trace formula vs dense products",
        ),
        Method(
            "fedrot_lora",
            rot_fast,
            rot_dense,
            lambda out, n: out[1][:n] @ out[0][:n],
            lambda out: out[1] @ out[0],
            f"A round, lambda {ROT_LAMBDA}: batched fits vs a loop over clients and layers",
        ),
        Method(
            "fedmomentum",
            momentum_fast,
            momentum_dense,
            lambda out, n: FLORA_SCALING * out[1][:n] @ out[0][:n],
            lambda out: FLORA_SCALING * out[1] @ out[0],
            "stack + thin SVD, top r vs dense dW + full SVD (the re-implementation's)",
        ),
        Method(
            "fed_sb",
            lambda: lowrank.weighted_average(sb_r, w),
            lambda n: dense_sum(n, lambda i: sb_b @ sb_r[i], lambda i: sb_a),
            lambda out, n: sb_b[:n] @ out[:n] @ sb_a[:n],
            lambda out: out,
            "average of R vs dense sum p_k B R_k A",
        ),
    ]
    return methods, lambda: lowrank.lora_fair_residual(a, b, w, FAIR_LAM, FAIR_LR)


def max_rel_error(fast: Tensor, dense: Tensor) -> float:
    """Largest per-layer ||fast - dense||_F / ||dense||_F, in float64."""
    fast, dense = fast.double(), dense.double()
    return ((fast - dense).norm(dim=(-2, -1)) / dense.norm(dim=(-2, -1))).max().item()


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> int:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 150))
    n_dense, scale = args.dense_layers, args.layers / args.dense_layers
    console.print(
        f"[bold]preset {args.preset}[/]: {args.layers} layers of {args.dim} x {args.dim}, "
        f"r = {args.rank}, K = {args.clients}, {args.dtype}, device {device}, "
        f"{torch.get_num_threads()} CPU threads, median of {args.repeats} after a warm-up "
        f"(dense: no new repeat after {args.dense_budget:g} s)"
    )
    if n_dense < args.layers:
        console.print(
            f"dense baselines timed on {n_dense} of {args.layers} layers and extrapolated "
            f"linearly (x {scale:g}); errors are over those {n_dense} layers"
        )
    table = Table(title="Server-side aggregation, one round")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("method", "note") else "right")
    all_pass = True
    methods, paper_fair = build_methods(args, device, dtype)
    for method in methods:
        method.fast()  # warm-up
        method.dense(1)
        t_fast, fast_out = median_time(method.fast, device, args.repeats)
        t_dense, dense_out = median_time(
            lambda m=method: m.dense(n_dense), device, args.repeats, args.dense_budget
        )
        t_dense *= scale
        error = max_rel_error(method.fast_update(fast_out, n_dense), method.dense_update(dense_out))
        ratio = t_dense / t_fast
        target, result = TARGETS.get(method.name), "-"
        if target is not None:
            result = "[green]pass[/]" if ratio >= target else "[red]FAIL[/]"
            all_pass &= ratio >= target
        table.add_row(
            method.name,
            fmt_time(t_fast),
            fmt_time(t_dense) + ("*" if n_dense < args.layers else ""),
            f"{ratio:,.1f}x",
            f"{error:.2e}",
            f">= {target:g}x" if target else "-",
            result,
            method.note,
        )
    console.print(table)
    t_default, (_, _, info) = median_time(paper_fair, device, 1)
    console.print(
        f"lora_fair with the paper's stopping rule (lr {FAIR_LR}, tol 1e-6, patience 5, at most "
        f"1000 steps): {info['iterations']} steps, {fmt_time(t_default)}, loss "
        f"{info['initial_loss']:.6g} -> {info['final_loss']:.6g}"
    )
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
