"""What `fedpeft compare tune=` searches for a method: a config key and the range of its values.

Each method declares its own space (`LowRankStrategy.search_space`), so one tuning protocol serves
every method and a new method tunes what its paper tunes. A range is either relative to the value
the run's composed config already holds (`Scale`: the method's own default, or a dp preset's rate,
times a factor), which keeps one space right for AdamW at 3e-3 and for DP-SGD at 20, or a list of
values (`Choice`). A range suggests its value through any object with Optuna's `suggest_float` and
`suggest_categorical`, so this module needs no tuner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol


class Trial(Protocol):
    """The part of an Optuna trial a range uses."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Scale:
    """Log-uniform over [low x v, high x v], v the key's value in the run's own config."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and 0 < self.low < self.high):
            raise ValueError(f"Scale needs 0 < low < high, finite; got {self.low}, {self.high}")

    def suggest(self, trial: Trial, key: str, current: Any) -> float:
        """A value for `key` around the run's `current` one."""
        if isinstance(current, bool) or not isinstance(current, int | float) or current <= 0:
            raise ValueError(
                f"{key}={current!r} cannot be scaled: a Scale range needs a positive number there"
            )
        value = float(current)
        return trial.suggest_float(key, self.low * value, self.high * value, log=True)

    def describe(self) -> str:
        """The range in words, for results.md."""
        return f"log-uniform in [{self.low:g}, {self.high:g}] x the run's value"


@dataclass(frozen=True)
class Choice:
    """One of a few values (e.g. a rank)."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.values) < 2:
            raise ValueError(f"Choice needs at least two values, got {self.values!r}")

    def suggest(self, trial: Trial, key: str, current: Any) -> Any:
        """One of the values (the run's own is not used)."""
        return trial.suggest_categorical(key, list(self.values))

    def describe(self) -> str:
        """The range in words, for results.md."""
        return "one of " + ", ".join(str(v) for v in self.values)


#: a method's space: dotted config key -> its range
SearchSpace = dict[str, Scale | Choice]

#: what every method tunes unless it says otherwise: its learning rate, two decades around its own
LEARNING_RATE: SearchSpace = {"train.lr": Scale(0.1, 10.0)}
