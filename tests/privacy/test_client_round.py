"""A client's private rounds: epsilon reported equals Opacus' accountant on the same history; the
ledger file is written as steps are taken and carries a restarted node's spending on."""

import dataclasses

import pytest
import torch
from opacus.accountants import create_accountant

from fedpeft import privacy
from fedpeft.privacy import (
    BudgetExhausted,
    DPSettings,
    LedgerFile,
    NodePolicy,
    PolicyViolation,
    PrivacyLedger,
    PrivateRoundFailed,
)
from tests.privacy.conftest import CPU, adam

OPEN = NodePolicy()


def _round(runtime, examples, store, settings, seed=0, steps=4, policy=OPEN):
    return privacy.private_round(
        runtime.model, examples, adam(runtime.model), store=store, policy=policy,
        settings=settings, steps=steps, batch_size=16, pad_token_id=0, device=CPU, seed=seed,
    )  # fmt: skip


@pytest.mark.parametrize("restart", [False, True])
def test_epsilon_accumulates_over_rounds_and_the_budget_stops_the_next(
    runtime, examples, dp_task, tmp_path, restart
):
    """With `restart`, every round opens the ledger file anew, as a restarted SuperNode would:
    the spending and the refusal are the same as for a node that never restarted."""
    settings = DPSettings.from_task(dp_task)  # eps 3 over 3 planned rounds of 4 steps
    assert settings.planned_rounds == 3
    state, reported = LedgerFile(tmp_path, 1, 0), []
    for server_round in range(3):
        runtime.reset({})
        if restart:
            state = LedgerFile(tmp_path, 1, 0)
        result, metrics = _round(runtime, examples, state, settings, seed=server_round)
        assert result.steps == 4 and metrics["dp-steps"] == 4 * (server_round + 1)
        reported.append(metrics["epsilon"])
        reference = create_accountant("prv")
        q = 16 / len(examples)
        reference.history = [(metrics["noise-multiplier"], q, 4 * (server_round + 1))]
        assert metrics["sample-rate"] == q
        assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(delta=metrics["delta"]))
    assert reported == sorted(reported) and 2.99 <= reported[-1] <= 3.0
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        _round(runtime, examples, LedgerFile(tmp_path, 1, 0), settings, seed=9)
    assert PrivacyLedger.open(state, settings, len(examples), 16, 4).steps == 12  # nothing spent
    # Another run (run id) or another client has a ledger of its own.
    assert not LedgerFile(tmp_path, 2, 0).exists() and not LedgerFile(tmp_path, 1, 1).exists()


def test_steps_of_a_round_that_fails_part_way_are_on_disk_and_the_cause_stays_home(
    runtime, examples, dp_task, tmp_path
):
    # Reproducible sampling (seed 0): the bad example is first drawn a few steps in.
    settings = dataclasses.replace(DPSettings.from_task(dp_task), reproducible=True)
    state = LedgerFile(tmp_path, 1, 0)
    bad = [*examples[:50], {**examples[0], "label": 7}]
    steps_on_disk = []
    save = LedgerFile.save

    def spy(self, fields):
        save(self, fields)
        steps_on_disk.append(sum(n for _, _, n in fields["history"]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LedgerFile, "save", spy)
        # label 7 of 2 classes fails inside the model; the reply names only the error's type
        with pytest.raises(PrivateRoundFailed) as failed:
            _round(runtime, bad, state, settings, steps=200)
    assert "IndexError" in str(failed.value) and "7" not in str(failed.value).split(")")[0]
    spent = PrivacyLedger.open(LedgerFile(tmp_path, 1, 0), settings, len(bad), 16, 200).steps
    assert 0 < spent < 200
    # Written before the first step, then after every step (each step once), then at the end.
    assert steps_on_disk[0] == 0 and steps_on_disk[-1] == spent
    assert steps_on_disk[1:-1] == list(range(1, spent + 1))


def test_the_policy_refuses_a_weaker_calibration_before_any_step(
    runtime, examples, dp_task, tmp_path
):
    settings = DPSettings.from_task(dp_task)  # delta null: 1e-5 for this client
    state = LedgerFile(tmp_path, 1, 0)
    with pytest.raises(PolicyViolation, match="dp-noise-multiplier=50 refuses the calibrated"):
        _round(runtime, examples, state, settings, policy=NodePolicy(noise_multiplier=50.0))
    with pytest.raises(PolicyViolation, match="dp-delta=1e-09 refuses the task's dp.delta=1e-05"):
        _round(runtime, examples, state, settings, policy=NodePolicy(delta=1e-9))
    assert not state.exists()  # nothing spent, nothing written
    # A ledger calibrated for epsilon 3 under a node policy lowered to 1 since: capped at 1.
    _, metrics = _round(runtime, examples, state, settings)
    lowered = NodePolicy(epsilon=metrics["epsilon"])
    with pytest.raises(BudgetExhausted, match=rf"> target {metrics['epsilon']:g} "):
        _round(runtime, examples, state, settings, policy=lowered)


@pytest.mark.parametrize("reproducible", [False, True])
def test_noise_comes_from_fresh_entropy_unless_reproducible(
    runtime, examples, reproducible, tmp_path
):
    """The server knows the round's seed: by default it must not determine the noise."""
    from tests.privacy.conftest import flat, trainable

    settings = DPSettings(enabled=True, target_epsilon=8.0, planned_rounds=2,
                          reproducible=reproducible)  # fmt: skip
    updates = []
    for _ in range(2):
        runtime.reset({})
        torch.manual_seed(0)  # dropout: the simulation seeds it per client round
        store = LedgerFile(tmp_path / str(len(updates)), 1, 0)
        _round(runtime, examples, store, settings, seed=7, steps=1)
        updates.append(flat(trainable(runtime.model)).clone())
    assert (updates[0] == updates[1]).all() == reproducible
