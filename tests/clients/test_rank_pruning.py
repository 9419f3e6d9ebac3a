"""Rank self-pruning on a node (clients/rank_pruning.py, docs/algorithms.md §10): the tail
regulariser, the prune rule on constructed tails, the held rank, and a private ClientApp round that
prunes."""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.adapters import AdapterSpec
from fedpeft.clients.client_app import train
from fedpeft.clients.rank_pruning import RankPruning, tail_score
from fedpeft.config import compose_config
from fedpeft.federation import build_task
from fedpeft.privacy import PRIVATE_REPLY_METRICS
from fedpeft.records import to_record
from tests.conftest import FAST_RUN

D_IN, D_OUT, LAYERS = 7, 5, 2


def _config(min_rank: int, gamma: float, lam: float = 1e-3) -> dict:
    return {"rank-min": min_rank, "rank-prune-gamma": gamma, "rank-prune-lambda": lam}


def _factors(rank: int, g: torch.Generator, tail: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(LAYERS):
        out[f"l{i}.lora_A"] = torch.randn(rank, D_IN, generator=g, dtype=torch.float64)
        out[f"l{i}.lora_B"] = torch.randn(D_OUT, rank, generator=g, dtype=torch.float64)
    return out


def _scale_tail(factors: dict, start: int, c: float) -> dict:
    out = {k: v.clone() for k, v in factors.items()}
    for key, value in out.items():
        if key.endswith(".lora_A"):
            value[start:] *= c
        elif key.endswith(".lora_B"):
            value[:, start:] *= c
    return out


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 12),
    min_rank=st.integers(1, 12),
    gamma=st.floats(0.05, 0.99),
    factors=st.lists(st.sampled_from([0.0, 0.5, 0.999, 1.0, 1.001, 2.0]), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_pruning_fires_only_when_the_tail_score_drops_and_never_below_min_rank(
    rank, min_rank, gamma, factors, seed
):
    """(e) Rounds whose trained tail is c x the received one: prune iff c < 1, to
    max(r_min, floor(gamma r)); the held rank only shrinks and never goes below r_min."""
    min_rank = min(min_rank, rank)
    g = torch.Generator().manual_seed(seed)
    state = RecordDict()
    held = rank
    for c in factors:
        sent = AdapterSpec("lora", rank, 2.0 * rank, ("query",))
        pruning, adapter = RankPruning.start(state, _config(min_rank, gamma), sent)
        assert pruning.rank == held == adapter.rank
        assert adapter.alpha == pytest.approx(2.0 * held)  # the scaling is kept
        received = pruning.receive(_factors(rank, g))
        start = math.floor(gamma * held)
        assert start == pruning.tail_start
        reply = pruning.finish(_scale_tail(received, start, c))
        score = float(tail_score(received, start))
        if c < 1 and score > 0:
            held = min(held, max(min_rank, start))
        assert pruning.rank == held >= min_rank and pruning.metrics() == {"adapter-rank": held}
        assert all(v.shape[0 if k.endswith("A") else 1] == held for k, v in reply.items())


def test_a_node_trains_at_the_rank_it_holds_and_reads_the_received_tail():
    state = RecordDict({"fedpeft.rank": ConfigRecord({"rank": 3})})
    sent = AdapterSpec("lora", 6, 12.0, ("query",))
    pruning, adapter = RankPruning.start(state, _config(2, 0.5), sent)
    assert (adapter.rank, adapter.alpha) == (3, 6.0) and pruning.tail_start == 1
    sent = _factors(6, torch.Generator().manual_seed(1))
    received = pruning.receive({**sent, "head.w": torch.ones(2)})
    assert torch.equal(received["l0.lora_A"], sent["l0.lora_A"][:3])
    assert torch.equal(received["l1.lora_B"], sent["l1.lora_B"][:, :3])
    assert torch.equal(received["head.w"], torch.ones(2))
    expected = sum(
        float(sent[f"l{i}.lora_B"][:, 1:3].norm() * sent[f"l{i}.lora_A"][1:3].norm())
        for i in range(LAYERS)
    )
    assert pruning.received == pytest.approx(expected, rel=1e-12)
    assert RankPruning.start(RecordDict(), {}, sent) == (None, sent)  # no rank-min: no pruning


def test_the_tail_regulariser_is_differentiable():
    """d/dB_t (||B_t|| ||A_t||) = ||A_t|| B_t / ||B_t||, and nothing reaches the leading ranks."""
    g = torch.Generator().manual_seed(2)
    factors = {k: v.requires_grad_() for k, v in _factors(4, g).items()}
    tail_score(factors, 3).backward()
    for i in range(LAYERS):
        a, b = factors[f"l{i}.lora_A"], factors[f"l{i}.lora_B"]
        a_t, b_t = a.detach()[3:], b.detach()[:, 3:]
        torch.testing.assert_close(b.grad[:, 3:], a_t.norm() * b_t / b_t.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(a.grad[3:], b_t.norm() * a_t / a_t.norm(), rtol=1e-12, atol=0)
        assert not b.grad[:, :3].any() and not a.grad[:3].any()


def test_a_private_client_round_prunes_through_the_regulariser(tmp_path, data_dir):
    """Under DP-SGD the tail penalty reaches the factors: a large received tail shrinks, the node
    cuts it (8 -> 4), keeps rank 4 and reports it in a private reply; sent 8 again, it trains at 4.
    """
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = compose_config(
        [*FAST_RUN, "dp=eps3", "adapter.train_head=false", "federation.local_steps=2"]
    )
    task = build_task(cfg, 2, ["negative", "positive"])
    g = torch.Generator().manual_seed(0)
    payload = {}
    for layer in range(2):
        for module in ("query", "value"):
            name = f"bert.encoder.layer.{layer}.attention.self.{module}"
            a = torch.cat([0.1 * torch.randn(4, 64, generator=g), torch.full((4, 64), 0.25)])
            b = torch.cat([torch.zeros(64, 4), torch.full((64, 4), 0.25)], dim=1)
            payload[f"{name}.lora_A"], payload[f"{name}.lora_B"] = a, b
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    ranks = []
    for server_round in (1, 2):
        config = ConfigRecord(
            {
                "task": json.dumps(task),
                "server-round": server_round,
                "adapter-rank": 8,
                "adapter-alpha": 8.0,
                **_config(2, 0.5, lam=0.5),
            }
        )
        msg = Message(
            RecordDict({"arrays": to_record(payload), "config": config}),
            dst_node_id=7,
            message_type=MessageType.TRAIN,
        )
        reply = train(msg, context)
        metrics = dict(reply.content.metric_records["metrics"])
        assert set(metrics) <= PRIVATE_REPLY_METRICS and "epsilon" in metrics
        arrays = reply.content.array_records["arrays"]
        ranks.append(metrics["adapter-rank"])
        assert all(a.shape[0 if k.endswith("A") else 1] == ranks[-1] for k, a in arrays.items())
    # round 2 received B[:, :4] = 0: its tail score is 0 and cannot drop, so no second prune
    assert ranks == [4, 4]
    assert context.state.config_records["fedpeft.rank"]["rank"] == 4
