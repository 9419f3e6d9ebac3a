"""`federation.stop_at.*`: when a federation stops before its last round, and which rule stopped it.

Three limits, each off when null: `accuracy` (held-out accuracy, met on an evaluated round),
`bytes` (adapter bytes moved up and down so far) and `epsilon` (the largest client epsilon
reported so far). The first round after which any is met is the run's last; round 0 (before any
training) never stops a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedpeft.errors import ConfigError

#: the rules, in the order they are checked (the first one met is reported)
RULES = ("accuracy", "bytes", "epsilon")

_EXAMPLES = {"accuracy": "0.85", "bytes": "5e6", "epsilon": "3"}


@dataclass(frozen=True)
class Stop:
    """The rule that stopped a run: the round it was met after, what was observed, the limit."""

    rule: str
    round: int
    value: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """summary.json's `stopped_early`."""
        return {
            "rule": self.rule,
            "round": self.round,
            "value": self.value,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class StopAt:
    """The run's limits (None: that rule is off)."""

    accuracy: float | None = None
    bytes: float | None = None
    epsilon: float | None = None

    @classmethod
    def parse(cls, raw: object) -> StopAt:
        """Validate `federation.stop_at`: each value null or a positive finite number.

        Accuracy is in (0, 1]; a bad value raises a ConfigError naming the key and the fix.
        """
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(
                f"federation.stop_at={raw} must be a mapping of rules, e.g. "
                "federation.stop_at.bytes=5e6"
            )
        values = dict(raw or {})
        unknown = sorted(set(values) - set(RULES))
        if unknown:
            raise ConfigError(
                f"federation.stop_at.{unknown[0]} is not a stopping rule: use one of "
                + ", ".join(f"federation.stop_at.{r}" for r in RULES)
            )
        for rule in RULES:
            value = values.get(rule)
            if value is None:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = number and math.isfinite(value) and value > 0
            if rule == "accuracy":
                ok = ok and value <= 1
            if not ok:
                allowed = "in (0, 1]" if rule == "accuracy" else "a positive finite number"
                raise ConfigError(
                    f"federation.stop_at.{rule}={value} must be {allowed} (or null: off), "
                    f"e.g. federation.stop_at.{rule}={_EXAMPLES[rule]}"
                )
        return cls(**{r: None if values.get(r) is None else float(values[r]) for r in RULES})

    @classmethod
    def from_config(cls, cfg: DictConfig) -> StopAt:
        """The run's `federation.stop_at` (all off when the config has none), validated."""
        node = OmegaConf.select(cfg, "federation.stop_at")
        return cls.parse(
            OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        )

    @property
    def enabled(self) -> bool:
        """Whether any rule is on."""
        return any(getattr(self, r) is not None for r in RULES)

    def check(
        self,
        server_round: int,
        *,
        accuracy: float | None,
        total_bytes: float,
        max_epsilon: float | None,
    ) -> Stop | None:
        """The rule met after `server_round`, or None.

        `accuracy` is the round's held-out accuracy (None when the round was not evaluated),
        `total_bytes` the adapter bytes moved up and down so far, `max_epsilon` the largest
        client epsilon reported so far (None in a non-private run).
        """
        if server_round < 1:
            return None
        observed = {"accuracy": accuracy, "bytes": total_bytes, "epsilon": max_epsilon}
        for rule in RULES:
            threshold, value = getattr(self, rule), observed[rule]
            if threshold is not None and value is not None and value >= threshold:
                return Stop(rule, server_round, float(value), threshold)
        return None
