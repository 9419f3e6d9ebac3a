"""A client's private rounds: epsilon reported equals Opacus' accountant on the same history."""

import dataclasses

import pytest
import torch
from flwr.app import RecordDict
from opacus.accountants import create_accountant

from fedpeft import privacy
from fedpeft.privacy import BudgetExhausted, DPSettings, PrivacyLedger
from tests.privacy.conftest import CPU, adam


def test_epsilon_accumulates_over_rounds_and_the_budget_stops_the_next(runtime, examples, dp_task):
    settings = DPSettings.from_task(dp_task)  # eps 3 over 3 planned rounds of 4 steps
    assert settings.planned_rounds == 3
    state, reported = RecordDict(), []
    for server_round in range(3):
        runtime.reset({})
        result, metrics = privacy.private_round(
            runtime.model, examples, adam(runtime.model), state=state, settings=settings,
            steps=4, batch_size=16, pad_token_id=0, device=CPU, seed=server_round,
        )  # fmt: skip
        assert result.steps == 4 and metrics["dp-steps"] == 4 * (server_round + 1)
        reported.append(metrics["epsilon"])
        reference = create_accountant("prv")
        q = 16 / len(examples)
        reference.history = [(metrics["noise-multiplier"], q, 4 * (server_round + 1))]
        assert metrics["sample-rate"] == q
        assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(delta=metrics["delta"]))
    assert reported == sorted(reported) and 2.99 <= reported[-1] <= 3.0
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        privacy.private_round(
            runtime.model, examples, adam(runtime.model), state=state, settings=settings,
            steps=4, batch_size=16, pad_token_id=0, device=CPU, seed=9,
        )  # fmt: skip
    assert PrivacyLedger.open(state, settings, len(examples), 16, 4).steps == 12  # nothing spent


def test_steps_of_a_round_that_fails_part_way_are_still_counted(runtime, examples, dp_task):
    # Reproducible sampling (seed 0): the bad example is first drawn a few steps in.
    settings = dataclasses.replace(DPSettings.from_task(dp_task), reproducible=True)
    state = RecordDict()
    bad = [*examples[:50], {**examples[0], "label": 7}]
    with pytest.raises(Exception):  # noqa: B017 - label 7 of 2 classes fails inside the model
        privacy.private_round(
            runtime.model, bad, adam(runtime.model), state=state, settings=settings,
            steps=200, batch_size=16, pad_token_id=0, device=CPU, seed=0,
        )  # fmt: skip
    spent = PrivacyLedger.open(state, settings, len(bad), 16, 200).steps
    assert 0 < spent < 200


@pytest.mark.parametrize("reproducible", [False, True])
def test_noise_comes_from_fresh_entropy_unless_reproducible(runtime, examples, reproducible):
    """The server knows the round's seed: by default it must not determine the noise."""
    from tests.privacy.conftest import flat, trainable

    settings = DPSettings(enabled=True, target_epsilon=8.0, planned_rounds=2,
                          reproducible=reproducible)  # fmt: skip
    updates = []
    for _ in range(2):
        runtime.reset({})
        torch.manual_seed(0)  # dropout: the simulation seeds it per client round
        privacy.private_round(
            runtime.model, examples, adam(runtime.model), state=RecordDict(), settings=settings,
            steps=1, batch_size=16, pad_token_id=0, device=CPU, seed=7,
        )  # fmt: skip
        updates.append(flat(trainable(runtime.model)).clone())
    assert (updates[0] == updates[1]).all() == reproducible
