"""Heterogeneous ranks through every method that accepts them, against float64 formulas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.cli import main
from fedpeft.lowrank import normalize_weights
from fedpeft.records import TensorSpec
from fedpeft.strategies import FedAvgLoRA, FLoRA, LoRAFAIR
from fedpeft.strategies.ranks import RankPlan
from tests.strategies.conftest import LAYERS, FakeGrid, R, global_adapter, reply
from tests.test_lowrank import dense_fair_solve

F64 = torch.float64
PROPS = settings(max_examples=20, deadline=None, database=None)
NAMES = [f"enc.{layer}.q" for layer in range(LAYERS)]


@st.composite
def rank_mixes(draw: st.DrawFn) -> dict:
    """K clients with ranks in [1, R], example counts, alpha, scaling and a factor scale."""
    k = draw(st.integers(1, 4))
    return {
        "ranks": draw(st.lists(st.integers(1, R), min_size=k, max_size=k)),
        "counts": draw(st.lists(st.integers(1, 500), min_size=k, max_size=k)),
        "alpha": draw(st.sampled_from([1.0, 8.0, 16.0, 32.0])),
        "scaling": draw(st.sampled_from(["per_rank", "shared"])),
        "scale": 10.0 ** draw(st.floats(-3.0, 2.0)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _run_round(cls, mix: dict, **kw):
    """One round of `cls` with mix's ranks: (strategy, messages, replies' tensors, p_k, s_k)."""
    task = {"adapter": {"rank": R, "alpha": mix["alpha"]}, "adapter_seed": 0}
    strategy = cls(
        global_adapter(),
        task,
        train_head=False,
        max_num_examples=1000,
        ranks=mix["ranks"],
        scaling=mix["scaling"],
        **kw,
    )
    nodes = list(range(10, 10 + len(mix["ranks"])))
    messages = list(strategy.configure_train(1, None, {}, FakeGrid(nodes)))
    g = torch.Generator().manual_seed(mix["seed"])
    updates = []
    for node in nodes:
        specs = strategy.up_specs(node)
        updates.append(
            {
                key: torch.randn(spec.shape, generator=g)
                * (mix["scale"] if key.endswith("lora_B") else 1.0)
                for key, spec in specs.items()
            }
        )
    strategy.aggregate_train(1, [reply(n, u, c) for n, u, c in zip(nodes, updates, mix["counts"])])
    assert strategy.stats.replied == len(nodes), strategy.stats.rejected
    ranks = [strategy.rank_of(n) for n in nodes]
    assert ranks == mix["ranks"]
    alphas = [m.content["config"]["adapter-alpha"] for m in messages]
    expected = [
        mix["alpha"] * r / R if mix["scaling"] == "per_rank" else mix["alpha"] for r in ranks
    ]
    assert alphas == pytest.approx(expected, rel=1e-12)
    s_k = [a / r for a, r in zip(alphas, ranks)]
    return strategy, messages, updates, normalize_weights(mix["counts"]), s_k


def _ideal(updates, p, s_k, name) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k of one layer, dense float64."""
    return sum(
        pk * sk * u[f"{name}.lora_B"].double() @ u[f"{name}.lora_A"].double()
        for pk, sk, u in zip(p.tolist(), s_k, updates)
    )


def _padded(updates, p, s_k, s, name):
    """float64 zero-padded averages: A = sum p_k [A_k; 0], B = sum p_k [B_k s_k / s, 0]."""
    a_ref = torch.zeros(R, updates[0][f"{name}.lora_A"].shape[1], dtype=F64)
    b_ref = torch.zeros(updates[0][f"{name}.lora_B"].shape[0], R, dtype=F64)
    for pk, sk, u in zip(p.tolist(), s_k, updates):
        r = u[f"{name}.lora_A"].shape[0]
        a_ref[:r] += pk * u[f"{name}.lora_A"].double()
        b_ref[:, :r] += pk * (sk / s) * u[f"{name}.lora_B"].double()
    return a_ref, b_ref


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


@PROPS
@given(rank_mixes())
def test_zero_padded_fedavg_matches_its_float64_formula(mix: dict) -> None:
    strategy, messages, updates, p, s_k = _run_round(FedAvgLoRA, mix)
    s = mix["alpha"] / R
    for name in NAMES:
        a_ref, b_ref = _padded(updates, p, s_k, s, name)
        assert _rel(strategy.global_adapter[f"{name}.lora_A"], a_ref) < 1e-6
        assert _rel(strategy.global_adapter[f"{name}.lora_B"], b_ref) < 1e-6
        if len(updates) == 1:  # one client: the global model is exactly that client's update
            a, b = (
                strategy.global_adapter[f"{name}.lora_A"],
                strategy.global_adapter[f"{name}.lora_B"],
            )
            assert _rel(s * b.double() @ a.double(), _ideal(updates, p, s_k, name)) < 1e-6


@settings(PROPS, max_examples=10)
@given(rank_mixes())
def test_zero_padded_down_payload_is_the_rank_rk_truncation(mix: dict) -> None:
    """Node k's model s_k B_k A_k from its payload is exactly s B[:, :r_k] A[:r_k]."""
    task = {"adapter": {"rank": R, "alpha": mix["alpha"]}}
    for cls in (FedAvgLoRA, LoRAFAIR):
        strategy = cls(
            global_adapter(mix["seed"] % 100),
            task,
            max_num_examples=1000,
            ranks=mix["ranks"],
            scaling=mix["scaling"],
        )
        nodes = list(range(len(mix["ranks"])))
        g, s = strategy.global_adapter, mix["alpha"] / R
        for msg in strategy.configure_train(1, None, {}, FakeGrid(nodes)):
            config = msg.content["config"]
            r, s_k = config["adapter-rank"], config["adapter-alpha"] / config["adapter-rank"]
            arrays = {k: torch.from_numpy(v.numpy()) for k, v in msg.content["arrays"].items()}
            assert {k for k in arrays if k.startswith("head.")} == set(strategy.head_keys())
            for name in NAMES:
                a, b = arrays[f"{name}.lora_A"], arrays[f"{name}.lora_B"]
                assert a.shape == (r, g[f"{name}.lora_A"].shape[1]) and b.shape[1] == r
                client = s_k * b.double() @ a.double()
                ref = s * g[f"{name}.lora_B"][:, :r].double() @ g[f"{name}.lora_A"][:r].double()
                assert _rel(client, ref) < 1e-6


@settings(PROPS, max_examples=15)
@given(rank_mixes())
def test_lora_fair_with_mixed_ranks_matches_its_float64_formula(mix: dict) -> None:
    """A_bar as zero-padded FedAvg; B' the dense solver's on dW* = sum p_k s_k B_k A_k / s."""
    strategy, _, updates, p, s_k = _run_round(LoRAFAIR, mix, max_iter=40, tol=0.0)
    s = mix["alpha"] / R
    problems = []
    for name in NAMES:
        a_ref, b_ref = _padded(updates, p, s_k, s, name)
        assert _rel(strategy.global_adapter[f"{name}.lora_A"], a_ref) < 1e-6
        x = _ideal(updates, p, s_k, name) / s
        problems.append((x[None], a_ref[None], b_ref[None]))
    refs, iterations = dense_fair_solve(problems, max_iter=40, tol=0.0)
    assert strategy.last_info["iterations"] == iterations == 40
    assert strategy.last_info["layers"] == LAYERS
    for name, ref in zip(NAMES, refs):
        assert _rel(strategy.global_adapter[f"{name}.lora_B"], ref[0]) < 1e-4


@PROPS
@given(rank_mixes())
def test_flora_stack_is_the_ideal_update_under_either_scaling(mix: dict) -> None:
    strategy, _, updates, p, s_k = _run_round(FLoRA, mix)
    (stack,) = strategy.stacks
    for name in NAMES:
        merged = stack[f"{name}.lora_B"].double() @ stack[f"{name}.lora_A"].double()
        assert _rel(merged, _ideal(updates, p, s_k, name)) < 1e-6
    if mix["scaling"] == "per_rank":
        assert s_k == pytest.approx([mix["alpha"] / R] * len(s_k), rel=1e-12)


def test_flora_default_is_the_published_alpha_of_twice_the_rank():
    """fedpeft's defaults (alpha 16, rank 8) under per_rank: the FLoRA code's alpha_k = 2 r_k."""
    plan = RankPlan.build([4, 8, 16], 8, 16.0, "per_rank", padded=False)
    assert [plan.alpha_of(r) for r in (4, 8, 16)] == [8.0, 16.0, 32.0]
    assert {plan.scaling_of(r) for r in (4, 8, 16)} == {2.0}
    shared = RankPlan.build([4, 8, 16], 8, 16.0, "shared", padded=False)
    assert [shared.scaling_of(r) for r in (4, 8, 16)] == [4.0, 2.0, 1.0]


@given(st.lists(st.integers(1, R), min_size=1, max_size=4), st.sampled_from(["per_rank", "shared"]))
@settings(PROPS, max_examples=10)
def test_pad_then_truncate_is_the_identity(ranks: list[int], scaling: str) -> None:
    plan = RankPlan.build(ranks, R, 16.0, scaling, padded=True)
    g = torch.Generator().manual_seed(sum(ranks))
    for r in ranks:
        update = {
            "l.lora_A": torch.randn(r, 5, generator=g),
            "l.lora_B": torch.randn(7, r, generator=g),
        }
        padded = plan.pad(update)
        assert padded["l.lora_A"].shape == (R, 5) and padded["l.lora_B"].shape == (7, R)
        back = plan.truncate(padded, r)
        torch.testing.assert_close(back["l.lora_A"], update["l.lora_A"], rtol=0, atol=0)
        torch.testing.assert_close(back["l.lora_B"], update["l.lora_B"], rtol=1e-6, atol=0)
        specs = plan.up_specs({"l.lora_A": TensorSpec((R, 5)), "l.lora_B": TensorSpec((7, R))}, r)
        assert specs["l.lora_A"].shape == (r, 5) and specs["l.lora_B"].shape == (7, r)
        # the padded pair at the global scaling s is exactly the client's own s_k B_k A_k
        s, s_k = 16.0 / R, plan.scaling_of(r)
        ours = s * padded["l.lora_B"].double() @ padded["l.lora_A"].double()
        theirs = s_k * update["l.lora_B"].double() @ update["l.lora_A"].double()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ranks": [0, 2]}, "strategy.params.ranks=[0, 2] must be a non-empty list"),
        ({"ranks": []}, "strategy.params.ranks=[] must be a non-empty list"),
        ({"ranks": [R + 1]}, f"set adapter.rank={R + 1}"),
        ({"ranks": [2], "scaling": "nope"}, "strategy.params.scaling=nope is unknown"),
    ],
)
def test_bad_rank_options_are_refused(kwargs: dict, message: str) -> None:
    for cls in (FedAvgLoRA, LoRAFAIR):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            cls(global_adapter(), {"adapter": {"rank": R, "alpha": 16}}, **kwargs)


@pytest.mark.parametrize("strategy", ["ffa_lora", "fedsvd", "fed_sb", "rolora"])
@pytest.mark.parametrize("prefix", ["", "+"])
def test_methods_without_per_client_ranks_refuse_them(strategy, prefix, capsys):
    """A shared frozen A (or B and A) of adapter.rank cannot take client ranks: exit 2, one line."""
    assert main(["simulate", f"strategy={strategy}", f"{prefix}strategy.params.ranks=[4,8]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"strategy.params.ranks: {strategy} cannot train clients at different ranks" in err
    takers = "fedavg, fedex_lora, flexlora, flora, hetlora or lora_fair"
    assert f"use strategy={takers}, or drop strategy.params.ranks" in err


def test_lora_fair_mixed_ranks_through_the_config(capsys):
    """lora_fair takes ranks and scaling from its config; a bad scaling exits 2 naming it."""
    assert main(["simulate", "strategy=lora_fair", "strategy.params.scaling=wrong"]) == 2
    assert "strategy.params.scaling=wrong is unknown" in capsys.readouterr().err
    assert main(["simulate", "strategy=flora", "strategy.params.ranks=[4,0]"]) == 2
    assert "strategy.params.ranks=[4, 0] must be a non-empty list" in capsys.readouterr().err
