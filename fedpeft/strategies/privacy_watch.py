"""The server's view of each client's privacy ledger: what it reported, and whether it went back.

A client's `dp-steps` and `epsilon` can only grow over a run. A reply whose numbers went backwards
comes from a node whose ledger was reset (a restarted SuperNode that lost its state directory, or
a node that lies): its true spending is unknown, so the reply is rejected and the client is not
sampled again. Every reported epsilon counts towards the run's epsilon, rejected replies
included: their budget was spent all the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpeft.protocol import DP_STEPS

#: Relative slack for epsilon: the same history evaluated twice may differ in its last digits.
_EPS_SLACK = 1e-6


def _number(value: object) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and math.isfinite(value) and value >= 0


@dataclass
class PrivacyWatch:
    """Per client (stable identity): the largest dp-steps and epsilon it ever reported."""

    steps: dict[int, int] = field(default_factory=dict)
    epsilon: dict[int, float] = field(default_factory=dict)

    def observe(self, member: int, metrics: Mapping[str, Any], private_run: bool) -> str | None:
        """Record a reply's ledger numbers; the reason to reject it, or None if they add up.

        In a private run every reply must report its ledger; in any run, a reply that reports
        one is held to it.
        """
        steps, eps = metrics.get(DP_STEPS), metrics.get("epsilon")
        if steps is None and eps is None:
            return "a private run's reply must report its privacy ledger" if private_run else None
        if not (_number(steps) and steps == int(steps) and _number(eps)):
            return f"malformed privacy ledger in the reply: dp-steps={steps!r}, epsilon={eps!r}"
        steps, eps = int(steps), float(eps)
        last_steps, last_eps = self.steps.get(member), self.epsilon.get(member)
        self.steps[member] = max(steps, last_steps or 0)
        self.epsilon[member] = max(eps, last_eps or 0.0)
        if last_steps is not None and (
            steps <= last_steps or eps < last_eps * (1 - _EPS_SLACK)  # type: ignore[operator]
        ):
            return (
                f"privacy ledger of client {member} was reset: dp-steps went from {last_steps} "
                f"to {steps} and epsilon from {last_eps:.4g} to {eps:.4g}; its true spending is "
                "unknown, so its replies are refused for the rest of the run"
            )
        return None

    def max_epsilon(self) -> float | None:
        """The largest epsilon any client ever reported (None when none did)."""
        return max(self.epsilon.values()) if self.epsilon else None

    def state(self) -> dict[str, Any]:
        """JSON-able state for the server's checkpoint."""
        return {
            "steps": [[m, s] for m, s in self.steps.items()],
            "epsilon": [[m, e] for m, e in self.epsilon.items()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> PrivacyWatch:
        """Restore what `state` gave (an empty watch for checkpoints written before it existed)."""
        state = state or {}
        return cls(
            steps={int(m): int(s) for m, s in state.get("steps", [])},
            epsilon={int(m): float(e) for m, e in state.get("epsilon", [])},
        )
