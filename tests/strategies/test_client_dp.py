"""Client-level DP on the server (fedpeft/strategies/client_dp.py and its use by the base)."""

import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from scipy.stats import norm

from fedpeft.privacy.client_level import ClientDPSettings, ClientNoise
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.client_dp import ClientLevelDP
from fedpeft.strategies.fedavg import FedAvgLoRA
from fedpeft.strategies.ffa_lora import FFALoRA
from tests.strategies.conftest import FakeGrid, global_adapter, reply

COMPOSING = {"fedavg", "ffa_lora", "fedsvd", "fed_sb", "rolora", "fedsa_lora"}


def mechanism(
    *,
    z: float | None = 1.0,
    clipping: str = "fixed",
    clip_norm: float = 1.0,
    population: int = 1000,
    rate: float = 0.1,
    seed: int = 0,
    **changes,
) -> ClientLevelDP:
    settings = ClientDPSettings(
        enabled=True,
        noise_multiplier=z,
        clipping=clipping,
        clip_norm=clip_norm,
        reproducible=True,
        **changes,
    )
    noise = ClientNoise.calibrate(settings, population=population, sample_rate=rate, rounds=100)
    return ClientLevelDP(settings, noise, seed=seed)


def vectors(norms, dim: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in norms:
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        out.append({"w": (v / v.norm() * length).float()})
    return out


def test_each_update_is_clipped_to_the_bound_as_a_whole():
    # Noise 1e-9 of the bound: the release is the clipped sum over the expected cohort.
    dp = mechanism(z=1e-9, clip_norm=0.5, population=40, rate=0.1)
    updates = [
        {"a": torch.full((3, 4), 10.0), "b": torch.full((5,), -10.0)},  # norm 24.5: clipped
        {"a": torch.full((3, 4), 0.01), "b": torch.zeros(5)},  # norm 0.035: kept
    ]
    out = dp.noisy_mean(updates, {"a": torch.Size([3, 4]), "b": torch.Size([5])})
    flat = torch.cat([out["a"].reshape(-1), out["b"]]).double() * dp.noise.expected_cohort
    big = torch.cat([torch.full((12,), 10.0), torch.full((5,), -10.0)]).double()
    expected = big / big.norm() * 0.5 + torch.cat([torch.full((12,), 0.01), torch.zeros(5)])
    torch.testing.assert_close(flat, expected.double(), rtol=1e-6, atol=1e-8)
    assert dp.last.clip_norm == 0.5 and dp.last.unclipped_fraction is None


@pytest.mark.parametrize("clip_norm", [1e-3, 1.0, 50.0])
@pytest.mark.parametrize("z", [0.5, 2.0])
def test_the_noise_standard_deviation_is_z_c_over_the_expected_cohort(z, clip_norm):
    dp = mechanism(z=z, clip_norm=clip_norm, population=200, rate=0.25)
    out = dp.noisy_mean([], {"w": torch.Size([200_000])})["w"].double()
    expected = z * clip_norm / 50
    assert out.mean().abs() < 4 * expected / math.sqrt(200_000)
    assert out.std().item() == pytest.approx(expected, rel=0.01)
    assert dp.rounds == 1 and dp.last.epsilon == dp.noise.epsilon(1)


def test_the_clipped_count_gets_its_own_noise():
    dp = mechanism(z=1.0, clipping="adaptive", clip_norm=1.0, population=1000, rate=0.1)
    assert dp.noise.count_stddev == pytest.approx(5.0)
    fractions = []
    for seed in range(400):
        dp.clip_norm = 1.0
        dp.noisy_mean(vectors([0.5] * 100, 4, seed), {"w": torch.Size([4])})
        fractions.append(dp.last.unclipped_fraction)
    # every update unclipped: (100 - 50 + N(0, 5^2)) / 100 + 0.5 = 1 + N(0, 0.05^2)
    assert np.mean(fractions) == pytest.approx(1.0, abs=0.01)
    assert np.std(fractions) == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_adaptive_clipping_tracks_a_known_quantile_of_the_norms(quantile):
    dp = mechanism(
        z=1.0, clipping="adaptive", clip_norm=0.01, population=1000, rate=0.1,
        target_quantile=quantile,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    trail = []
    for step in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=100)  # median 1
        dp.noisy_mean(vectors(norms, 4, step), {"w": torch.Size([4])})
        trail.append(dp.clip_norm)
    truth = float(np.exp(0.5 * norm.ppf(quantile)))
    assert np.mean(trail[-100:]) == pytest.approx(truth, rel=0.1)


def test_flowers_adaptive_wrapper_steps_the_bound_away_from_its_quantile():
    # Why fedpeft does not wrap Flower's DifferentialPrivacyServerSideAdaptiveClipping: with
    # every update above the bound its rule shrinks the bound further (the clipped fraction
    # stands where Andrew et al. put the unclipped one).
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        FlowerFedAvg(), noise_multiplier=0.0, num_sampled_clients=10, initial_clipping_norm=0.1
    )
    current = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    wrapper.current_arrays = current  # what its configure_train keeps of the round
    replies = []
    for node in range(10):
        sent = Message(RecordDict(), dst_node_id=node + 1, message_type=MessageType.TRAIN)
        record = ArrayRecord({"w": Array(np.full(4, 5.0, np.float32))})
        content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 1})})
        replies.append(Message(content, reply_to=sent))
    wrapper.aggregate_train(1, replies)
    assert wrapper.clipping_norm < 0.1  # every update was clipped, yet the bound went down
    ours = mechanism(
        z=1.0, clipping="adaptive", clip_norm=0.1, population=100, rate=0.1, count_stddev=1.0
    )
    ours.noisy_mean(vectors([10.0] * 10, 4), {"w": torch.Size([4])})
    assert ours.clip_norm > 0.1


def test_a_reproducible_mechanism_repeats_and_an_unseeded_one_does_not():
    shapes = {"w": torch.Size([64])}
    first = mechanism(seed=3).noisy_mean([], shapes)["w"]
    torch.testing.assert_close(first, mechanism(seed=3).noisy_mean([], shapes)["w"])
    secret = ClientDPSettings(enabled=True, noise_multiplier=1.0, clipping="fixed")
    noise = ClientNoise.calibrate(secret, population=100, sample_rate=0.1, rounds=5)
    a = ClientLevelDP(secret, noise, seed=3).noisy_mean([], shapes)["w"]
    b = ClientLevelDP(secret, noise, seed=3).noisy_mean([], shapes)["w"]
    assert not torch.equal(a, b)


def test_state_round_trips_for_a_resumed_server():
    dp = mechanism(clipping="adaptive", clip_norm=0.3, z=1.0, population=1000, rate=0.1)
    dp.noisy_mean(vectors([1.0] * 100, 8), {"w": torch.Size([8])})
    tensors, meta = dp.state_dict()
    resumed = mechanism(clipping="adaptive", clip_norm=0.3, z=1.0, population=1000, rate=0.1)
    resumed.load_state_dict(tensors, meta)
    assert (resumed.rounds, resumed.clip_norm) == (1, dp.clip_norm)
    shapes = {"w": torch.Size([8])}
    torch.testing.assert_close(resumed.noisy_mean([], shapes), dp.noisy_mean([], shapes))
    with pytest.raises(ValueError, match="no client-level DP state"):
        resumed.load_state_dict({}, {})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_method_says_whether_it_composes(name):
    klass = STRATEGIES[name]
    reason = klass.client_dp_refusal({})
    assert (reason is None) == (name in COMPOSING)
    if reason is not None:
        with pytest.raises(ValueError, match=f"client_dp.enabled=true with {name}: "):
            klass(global_adapter(), {}, client_dp=mechanism())


def test_fedavg_with_per_client_ranks_is_refused():
    assert "strategy.params.ranks" in FedAvgLoRA.client_dp_refusal({"ranks": [2, 4]})


def test_a_round_releases_start_plus_the_noisy_mean_with_uniform_weights():
    start = global_adapter()
    strategy = FFALoRA(start, {}, fraction=0.5, num_clients=4, client_dp=mechanism(
        z=1e-9, clip_norm=100.0, population=4, rate=0.5
    ))  # fmt: skip
    grid = FakeGrid([1, 2, 3, 4])
    sampled = [
        m.metadata.dst_node_id for m in strategy.configure_train(1, None, ConfigRecord(), grid)
    ]
    keys = strategy.up_keys()
    shifts = {1: 1.0, 2: 3.0, 3: -2.0, 4: 0.5}
    replies = [
        reply(n, {k: start[k] + shifts[n] for k in keys}, num_examples=10**n) for n in sampled
    ]
    record, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-replies"] == len(sampled)
    mean_shift = sum(shifts[n] for n in sampled) / 2.0  # divided by q N = 2, not by the replies
    for key in keys:
        torch.testing.assert_close(strategy.global_adapter[key], start[key] + mean_shift)
    a_keys = strategy.factor_keys("lora_A")
    assert all(torch.equal(strategy.global_adapter[k], start[k]) for k in a_keys)
    assert strategy.stats.train_loss is None and not strategy.stats.client_loss
    assert strategy.stats.client_dp.epsilon > 0 and strategy.stats.update_norm is None


def test_a_round_with_no_replies_still_releases_noise_and_counts():
    start = global_adapter()
    strategy = FFALoRA(start, {}, fraction=0.5, num_clients=4, client_dp=mechanism(
        z=1.0, clip_norm=1.0, population=4, rate=0.5
    ))  # fmt: skip
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    strategy.aggregate_train(1, [])
    moved = [k for k in strategy.up_keys() if not torch.equal(strategy.global_adapter[k], start[k])]
    assert moved == strategy.up_keys() and strategy.client_dp.rounds == 1


def test_clients_are_poisson_sampled_at_the_fraction():
    strategy = FedAvgLoRA(global_adapter(), {}, fraction=0.1, min_clients=5, client_dp=mechanism(
        population=200, rate=0.1
    ))  # fmt: skip
    grid = FakeGrid(range(1, 201))
    sizes = [len(strategy.configure_train(r, None, ConfigRecord(), grid)) for r in range(1, 301)]
    assert np.mean(sizes) == pytest.approx(20, rel=0.05)
    assert np.std(sizes) == pytest.approx(math.sqrt(200 * 0.1 * 0.9), rel=0.15)
    assert min(sizes) < 20 < max(sizes)  # not fixed-size, and min_clients does not apply
