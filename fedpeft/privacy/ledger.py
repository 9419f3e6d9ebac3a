"""A client's privacy ledger: its calibration and its accountant's history, kept across rounds.

The ledger lives in a file the node owns (ledger_file.py), so a client's spending accumulates
over every round it trains in, across restarts of its process (a fresh accountant per round, or
per process, would forget earlier rounds). It is calibrated once per run, at the client's first
private round in it, and refuses a round that would take the run past its target epsilon, or the
node's spending on the same data over all runs (the earlier runs' histories composed with this
one's, by the same accountant) past the node's lifetime cap.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import IAccountant, create_accountant

from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.privacy.calibration import calibrate_noise
from fedpeft.privacy.ledger_file import LedgerFile
from fedpeft.privacy.settings import DPSettings, default_delta
from fedpeft.protocol import BUDGET_EXHAUSTED


class BudgetExhausted(FedPeftError):
    """The client's next round would spend more than its target epsilon."""


@dataclass
class PrivacyLedger:
    """Calibration (sigma, q, delta, target) and the (sigma, q, steps) history of one client."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    target_epsilon: float
    accountant_name: str
    num_examples: int
    history: list[tuple[float, float, int]] = field(default_factory=list)
    #: the (sigma, q, steps) histories of every other run on the same data, in run order
    earlier: tuple[tuple[float, float, int], ...] = ()

    @classmethod
    def open(
        cls,
        store: LedgerFile,
        settings: DPSettings,
        num_examples: int,
        batch_size: int,
        steps_per_round: int,
    ) -> PrivacyLedger:
        """This node's ledger from its file, or a newly calibrated one at its first round.

        A new ledger is not written until `save`: a round refused before training spends nothing.
        """
        runs = store.runs()
        earlier = tuple(
            (float(sig), float(q), int(n))
            for run_id, fields in sorted(runs.items())
            if run_id != store.run_id
            for sig, q, n in fields["history"]
        )
        saved = runs.get(store.run_id)
        if saved is not None:
            ledger = cls._load(saved)
            ledger.earlier = earlier
            if ledger.num_examples != num_examples:
                raise FedPeftError(
                    f"this client's data changed from {ledger.num_examples} to {num_examples} "
                    "examples since its privacy budget was calibrated: restore the data or start "
                    "a new run"
                )
            return ledger
        sample_rate = min(1.0, batch_size / num_examples)
        if settings.delta is not None and settings.delta >= 1 / num_examples:
            raise ConfigError(
                f"dp.delta={settings.delta:g} is not below 1/n_k = 1/{num_examples} for this "
                f"client's n_k={num_examples} examples (a delta that large allows publishing an "
                "example outright): set dp.delta below 1/n_k, e.g. dp.delta=null for "
                f"{default_delta(num_examples):g}"
            )
        delta = settings.delta or default_delta(num_examples)
        sigma = settings.noise_multiplier
        if sigma is None:
            sigma = calibrate_noise(
                settings.target_epsilon,
                delta,
                sample_rate,
                settings.planned_rounds * steps_per_round,
                settings.accountant,
            )
        return cls(
            float(sigma),
            sample_rate,
            delta,
            float(settings.target_epsilon),
            settings.accountant,
            num_examples,
            earlier=earlier,
        )

    @classmethod
    def _load(cls, record: dict[str, Any]) -> PrivacyLedger:
        return cls(
            noise_multiplier=float(record["noise_multiplier"]),
            sample_rate=float(record["sample_rate"]),
            delta=float(record["delta"]),
            target_epsilon=float(record["target_epsilon"]),
            accountant_name=str(record["accountant"]),
            num_examples=int(record["num_examples"]),
            history=[(float(s), float(q), int(n)) for s, q, n in record["history"]],
        )

    def save(self, store: LedgerFile) -> None:
        """Write the ledger to the node's file, atomically (replacing the previous version)."""
        store.save(
            {
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "delta": self.delta,
                "target_epsilon": self.target_epsilon,
                "accountant": self.accountant_name,
                "num_examples": self.num_examples,
                "history": [[float(s), float(q), int(n)] for s, q, n in self.history],
            }
        )

    def accountant(self) -> IAccountant:
        """An Opacus accountant holding this ledger's history (steps taken so far)."""
        accountant = create_accountant(self.accountant_name)
        accountant.history = list(self.history)
        return accountant

    def record(self, accountant: IAccountant) -> None:
        """Take the history of an accountant that was stepped by the optimiser this round."""
        self.history = [(float(s), float(q), int(n)) for s, q, n in accountant.history]

    @property
    def steps(self) -> int:
        """Private optimiser steps taken so far, over all rounds."""
        return sum(n for _, _, n in self.history)

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent at this ledger's delta so far, or after `extra_steps` more steps."""
        history = list(self.history)
        if extra_steps:
            history = _extend(history, self.noise_multiplier, self.sample_rate, extra_steps)
        if not history:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return spent_epsilon(self.accountant_name, tuple(history), self.delta)

    def lifetime_epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent on this data over every run so far (or after `extra_steps` more)."""
        history = list(self.history)
        if extra_steps:
            history = _extend(history, self.noise_multiplier, self.sample_rate, extra_steps)
        combined = (*self.earlier, *history)
        if not combined:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in combined):
            return math.inf
        return spent_epsilon(self.accountant_name, combined, self.delta)

    def check_lifetime(self, steps: int, cap: float | None) -> None:
        """Raise BudgetExhausted if `steps` more steps would take this data's spending past `cap`.

        The earlier runs' histories and this run's are composed by this run's accountant, at this
        run's delta.
        """
        if cap is None:
            return
        after = self.lifetime_epsilon(steps)
        if not after <= cap * (1 + 1e-9):
            raise BudgetExhausted(
                f"{BUDGET_EXHAUSTED}: this node's lifetime ε on its data would reach {after:.3f} > "
                f"its dp-lifetime-epsilon {cap:g} (δ={self.delta:g}) over all runs; it trains no "
                "more on this data"
            )

    def check_budget(self, steps: int) -> None:
        """Raise BudgetExhausted if `steps` more steps would take epsilon past the target."""
        after = self.epsilon(steps)
        if not after <= self.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(
                f"{BUDGET_EXHAUSTED}: ε would reach {after:.3f} > target {self.target_epsilon:g} "
                f"(δ={self.delta:g}) after {self.steps + steps} steps; this client stops training"
            )


@functools.lru_cache(maxsize=64)
def spent_epsilon(
    accountant_name: str, history: tuple[tuple[float, float, int], ...], delta: float
) -> float:
    """Epsilon of an accountant history at `delta`, cached.

    A round's budget check predicts exactly the history its reply then reports, so the reply
    reuses that evaluation.
    """
    accountant = create_accountant(accountant_name)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _extend(
    history: list[tuple[float, float, int]], sigma: float, rate: float, steps: int
) -> list[tuple[float, float, int]]:
    """History plus `steps` steps, merged into the last entry if sigma and q match (as Opacus)."""
    if history and history[-1][:2] == (sigma, rate):
        return [*history[:-1], (sigma, rate, history[-1][2] + steps)]
    return [*history, (sigma, rate, steps)]
