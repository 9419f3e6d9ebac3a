"""`fedpeft audit`: canaries reach the clients, the bound stays under an honest run's epsilon and
rises above a broken (noise-free) run's, and the command fails on the broken one."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch

from fedpeft import audit, privacy
from fedpeft.clients.client_data import client_example_count, client_examples
from fedpeft.config import compose_config
from fedpeft.data.canaries import CanarySet
from fedpeft.errors import ConfigError
from fedpeft.federation import prepare
from fedpeft.models import load_tokenizer
from fedpeft.runtime import model_spec
from tests.conftest import FAST_RUN, in_process_rounds

RUN = [*FAST_RUN, "dp=eps3", "federation.local_steps=10", "federation.rounds=3"]


def test_canaries_are_seeded_split_between_clients_and_counted(data_dir):
    canaries = CanarySet(300, seed=4)
    assert np.array_equal(canaries.included(), CanarySet(300, seed=4).included())
    assert 100 < canaries.included().sum() < 200  # each w.p. 1/2
    fed = prepare(compose_config(RUN))
    audit.insert_canaries(fed, canaries)
    tokenizer = load_tokenizer(model_spec(fed.task))
    held = [canaries.for_client(p, 2, tokenizer, 2) for p in (0, 1)]
    assert sum(len(h) for h in held) == canaries.included().sum()
    for partition, mine in enumerate(held):
        node = {"partition-id": partition, "num-partitions": 2}
        examples = client_examples(fed.task, node)
        assert examples[-len(mine) :] == mine
        assert client_example_count(fed.task, node) == len(examples)
        assert len(examples) == fed.partition_sizes[partition] + len(mine)
    assert fed.strategy.rules.max_num_examples == max(fed.partition_sizes) + 300


def test_gradient_canaries_sit_on_distinct_coordinates_and_count_as_examples(data_dir):
    canaries = CanarySet(500, seed=3, kind="gradient")
    tensor, flat, sign = canaries.coordinates([300, 1000, 256])
    offsets = np.array([0, 300, 1300])
    assert len(set((offsets[tensor] + flat).tolist())) == 500
    assert (flat < np.array([300, 1000, 256])[tensor]).all() and set(sign) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="use fewer canaries"):
        canaries.coordinates([100, 100])
    fed = prepare(compose_config(RUN))
    audit.insert_canaries(fed, canaries)
    held = [canaries.held(p, 2) for p in (0, 1)]
    assert sorted(np.concatenate(held).tolist()) == np.flatnonzero(canaries.included()).tolist()
    for partition in (0, 1):
        node = {"partition-id": partition, "num-partitions": 2}
        assert len(client_examples(fed.task, node)) == fed.partition_sizes[partition]
        assert client_example_count(fed.task, node) == fed.partition_sizes[partition] + len(
            held[partition]
        )


def test_a_sampled_gradient_canary_adds_its_bound_at_its_coordinate_and_nothing_else():
    params = [torch.zeros(4, 100), torch.zeros(300)]
    held = privacy.HeldCanaries.place(CanarySet(50, seed=0, kind="gradient"), params, 0, 1)
    summed = [torch.zeros_like(p) for p in params]
    rng = torch.Generator().manual_seed(0)
    assert held.add_sampled(summed, 1.0, 0.5, rng) == held.count
    flat = torch.cat([s.reshape(-1) for s in summed])
    assert int((flat != 0).sum()) == held.count and set(flat[flat != 0].tolist()) == {-0.5, 0.5}
    assert float(flat.abs().sum()) == pytest.approx(0.5 * held.count)
    summed = [torch.zeros_like(p) for p in params]
    taken = [held.add_sampled(summed, 0.3, 1.0, rng) for _ in range(200)]
    assert 0.25 * held.count < np.mean(taken) < 0.35 * held.count  # Poisson, rate q


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["canaries=1"], "canaries=1 must be in \\[2, 100000\\]"),
        (["confidence=1.5"], "confidence=1.5 must be in \\(0, 1\\)"),
        (["canaries=many"], "canaries must be a int"),
        (["canary_kind=dirac"], "canary_kind=dirac is unknown: choose auto"),
    ],
)
def test_bad_audit_options_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        audit.split_options(args)
    assert audit.split_options(["dp=eps3", "canaries=50"]) == (
        ["dp=eps3"],
        {
            "canaries": 50,
            "canary_seed": 0,
            "canary_kind": "auto",
            "confidence": 0.95,
            "canary_clients": 0,
        },
    )


def test_gradient_canaries_need_a_private_run(data_dir):
    fed = prepare(compose_config(FAST_RUN))
    with pytest.raises(ConfigError, match="canary_kind=input, or run it private"):
        audit.canary_set(fed, {**audit.OPTIONS, "canary_kind": "gradient"})
    assert audit.canary_set(fed, audit.OPTIONS).kind == "input"


def _weak_noise(fraction: float):
    """A broken build: Opacus draws noise at `fraction` of the sigma the ledger accounts."""
    add_noise = opacus_optimizer.DPOptimizer.add_noise

    def weak(self):
        sigma = self.noise_multiplier
        self.noise_multiplier = sigma * fraction
        try:
            add_noise(self)
        finally:
            self.noise_multiplier = sigma

    return weak


def _audited(tmp_path, canaries: CanarySet, run: list[str] = RUN, rounds: int = 3) -> dict:
    fed = prepare(compose_config(run))
    audit.insert_canaries(fed, canaries)
    initial = {k: v.clone() for k, v in fed.strategy.global_adapter.items()}
    in_process_rounds(fed, rounds, tmp_path, simulated=True)
    accounted = fed.strategy.privacy.max_epsilon()
    return audit.audit_federation(fed, canaries, accounted, 0.95, initial)


GRADIENT = CanarySet(1000, seed=1, kind="gradient")


def test_an_honest_private_run_stays_under_its_ledger(tmp_path, data_dir):
    honest = _audited(tmp_path, GRADIENT)
    assert 2.9 <= honest["accounted_epsilon"] <= 3.0
    assert honest["audited_epsilon_lower_bound"] < 1.0  # measured 0.30
    assert audit.verdict(honest) is None
    assert honest["canary_kind"] == "gradient" and honest["score"] == "coordinate"


@pytest.mark.parametrize("fraction", [0.0, 0.1], ids=["noise-free", "tenth-of-sigma"])
def test_a_run_with_less_noise_than_its_ledger_is_caught(tmp_path, monkeypatch, fraction, data_dir):
    monkeypatch.setattr(opacus_optimizer.DPOptimizer, "add_noise", _weak_noise(fraction))
    broken = _audited(tmp_path, GRADIENT)
    assert 2.9 <= broken["accounted_epsilon"] <= 3.0  # the ledger cannot tell
    assert broken["audited_epsilon_lower_bound"] > broken["accounted_epsilon"]  # 4.36, 3.88
    assert "leaked more than it accounted" in audit.verdict(broken)
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"max_epsilon": broken["accounted_epsilon"]}))
    audit.write_audit(run, broken)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["audited_epsilon_lower_bound"] == broken["audited_epsilon_lower_bound"]
    assert json.loads((run / "audit.json").read_text())["canaries"] == 1000


def test_input_canaries_score_by_loss_and_alignment_and_stay_under_the_ledger(tmp_path, data_dir):
    record = _audited(tmp_path, CanarySet(100, seed=1, length=4), RUN, rounds=2)
    assert set(record["by_score"]) == {"loss", "alignment"}
    assert record["audited_epsilon_lower_bound"] <= record["accounted_epsilon"]
    assert record["canary_kind"] == "input"


#: one round of 10 steps: in process the noise-free build's bound is 3.94 with 2000 canaries
ONE_ROUND = [*RUN, "federation.rounds=1"]


def test_the_command_fails_on_a_noise_free_federation_through_flower(tmp_path, data_dir):
    """`fedpeft audit` on a real simulation whose every Ray worker runs the noise-free build."""
    marker = tmp_path / "noise-was-off"
    broken = str(Path(__file__).parent / "privacy" / "broken_dp")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([broken, os.environ.get("PYTHONPATH", "")]),
        "FEDPEFT_BROKEN_DP": "noise",
        "FEDPEFT_BROKEN_DP_MARKER": str(marker),
    }
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpeft.cli",
            "audit",
            *ONE_ROUND,
            f"run_dir={run}",
            "canaries=2000",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "this run leaked more than it accounted for" in proc.stderr
    assert marker.exists()  # the clients trained in Ray's workers without noise
    summary = json.loads((run / "summary.json").read_text())
    assert summary["audited_epsilon_lower_bound"] > summary["max_epsilon"]
    assert summary["audit"]["canary_kind"] == "gradient"


def test_canary_clients_join_the_rounds_and_give_a_client_level_estimate(tmp_path, data_dir):
    fed = prepare(compose_config(RUN))
    clients = audit.add_canary_clients(fed, 40, seed=0)
    initial = {k: v.clone() for k, v in fed.strategy.global_adapter.items()}
    in_process_rounds(fed, 3, tmp_path, simulated=True)
    assert (clients.rounds_in == 3).all()  # fraction 1: every canary client in every round
    record = audit.client_level_estimate(clients, initial, fed.strategy.global_adapter, 1e-5)
    low, high = record["cosine_inserted"], record["cosine_null"]
    assert low[0] > high[0] + 3 * high[1] / 40**0.5  # inserted canaries point along the model
    assert 0 < record["epsilon_estimate"] <= record["epsilon_two_gaussians"] * 1.5
    assert record["canary_clients_inserted"] == 40
    with pytest.raises(ConfigError, match="canary_clients=1 must be 0"):
        audit.split_options(["canary_clients=1"])


def test_canary_clients_estimate_client_level_dps_accounted_epsilon(tmp_path, data_dir):
    """Canary clients join client_dp's clipped sum; their estimate meets the accounted epsilon.

    Every client in every round (q = 1), so the Gaussian mechanism's epsilon is nearly tight: an
    estimate from 200 canaries falls either side of it (measured 2.98 and 3.65 against 3.00
    accounted over two noise draws; 7.41 against 8.00 at client_dp=eps8). Noise missing or too
    small drives it far above (55 against a true 10 without the server's noise,
    docs/privacy.md).
    """
    overrides = [*FAST_RUN, "federation.rounds=3", "client_dp=eps3", "client_dp.clipping=fixed"]
    fed = prepare(compose_config([*overrides, "client_dp.reproducible=true"]))
    clients = audit.add_canary_clients(fed, 200, seed=0)
    initial = {k: v.clone() for k, v in fed.strategy.global_adapter.items()}
    in_process_rounds(fed, 3, tmp_path, simulated=True)
    assert (clients.rounds_in == 3).all()
    mechanism = fed.strategy.client_dp
    record = audit.client_level_estimate(
        clients, initial, fed.strategy.global_adapter, mechanism.noise.delta, mechanism.epsilon()
    )
    accounted = record["accounted_client_level_epsilon"]
    assert accounted == mechanism.epsilon() and 2.9 <= accounted <= 3.0 * (1 + 1e-6)
    assert 0.6 * accounted <= record["epsilon_estimate"] <= 1.5 * accounted
    # A server that adds a tenth of the accounted noise is caught by the same estimate.
    weak = prepare(compose_config([*overrides, "client_dp.reproducible=true"]))
    weak.strategy.client_dp.noise = dataclasses.replace(
        weak.strategy.client_dp.noise, update_multiplier=mechanism.noise.update_multiplier / 10
    )
    clients = audit.add_canary_clients(weak, 200, seed=0)
    in_process_rounds(weak, 3, tmp_path / "weak", simulated=True)
    leaky = audit.client_level_estimate(
        clients, initial, weak.strategy.global_adapter, mechanism.noise.delta, accounted
    )
    assert leaky["epsilon_estimate"] > 2 * accounted


def test_gradient_canaries_catch_a_noise_free_causal_lm(tmp_path, monkeypatch, data_dir):
    from tests.test_causal_federation import CAUSAL_RUN

    monkeypatch.setattr(opacus_optimizer.DPOptimizer, "add_noise", _weak_noise(0.0))
    run = [*CAUSAL_RUN, "strategy=fedavg", "dp=eps3", "train.batch_size=64"]
    run += ["train.max_length=32", "federation.local_steps=20", "federation.rounds=1"]
    record = _audited(tmp_path, CanarySet(500, seed=0, kind="gradient"), run, rounds=1)
    assert record["canary_kind"] == "gradient" and 2.9 <= record["accounted_epsilon"] <= 3.0
    assert audit.verdict(record) is not None  # measured 3.74 over 2 rounds of 10 steps
