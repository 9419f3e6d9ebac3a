"""A node's own privacy policy: the floor every round's task must meet, whatever the server says.

The node is the privacy boundary. A deployed SuperNode states its policy in its node config; a
simulated node gets the same policy from the run's `dp` group (`for_simulation`), so one check
serves both. A task may be stricter than the policy, never weaker: a weaker one is refused with
an error naming the policy field and the task's value, before anything is trained.

| node config key | meaning |
|---|---|
| `dp-required` | true: this node trains only under DP-SGD |
| `dp-epsilon` | the largest total epsilon this node spends in a run (implies dp-required) |
| `dp-delta` | the largest delta it accepts |
| `dp-max-grad-norm` | the largest clipping bound C it accepts |
| `dp-noise-multiplier` | the smallest noise multiplier sigma it accepts |
| `dp-accountant` | the accountant that calibrates and counts its spending: prv (default) or rdp |
| `dp-lifetime-epsilon` | the most epsilon it spends on its data in all runs (default dp-epsilon) |
| `secagg-required` | true: this node sends updates only inside SecAgg+ (secure_sum_mods.py) |
| `secagg-min-threshold` | the fewest key shares that may rebuild this node's SecAgg+ secrets |
| `state-dir` | where its privacy ledgers live (default: `default_state_dir()`) |

`dp-required` needs `dp-epsilon`: a node that requires DP but sets no epsilon would accept any
epsilon up to the largest a task may name, so that is a configuration error. Whatever the policy
says, a node that has spent budget in a run trains only under DP in it from then on, and a
deployed node always refuses reproducible noise (its seed is known to the server). Every
comparison fails closed: a value that is not a finite number is refused, never let through.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.privacy.settings import ACCOUNTANTS, DPSettings
from fedpeft.schema import finite_number

REQUIRED, EPSILON, DELTA = "dp-required", "dp-epsilon", "dp-delta"
MAX_GRAD_NORM, NOISE_MULTIPLIER, STATE_DIR = "dp-max-grad-norm", "dp-noise-multiplier", "state-dir"
ACCOUNTANT, LIFETIME_EPSILON = "dp-accountant", "dp-lifetime-epsilon"
SECAGG_REQUIRED, SECAGG_MIN_THRESHOLD = "secagg-required", "secagg-min-threshold"
POLICY_KEYS = (
    SECAGG_REQUIRED,
    SECAGG_MIN_THRESHOLD,
    REQUIRED,
    EPSILON,
    DELTA,
    MAX_GRAD_NORM,
    NOISE_MULTIPLIER,
    ACCOUNTANT,
    LIFETIME_EPSILON,
    STATE_DIR,
)
#: Relative slack when comparing the task's numbers with the policy's (JSON round trips).
_SLACK = 1e-9


class PolicyViolation(FedPeftError):
    """The round's task is weaker than this node's privacy policy allows."""


def secagg_required(node_config: Mapping[str, Any]) -> bool:
    """Node config `secagg-required` (default false); anything but a boolean is refused."""
    value = node_config.get(SECAGG_REQUIRED, False)
    if not isinstance(value, bool):
        raise ConfigError(f"node config {SECAGG_REQUIRED}={value!r} must be true or false")
    return value


def secagg_min_threshold(node_config: Mapping[str, Any]) -> int:
    """Node config `secagg-min-threshold` (default 2, SecAgg+'s own floor): an integer >= 2.

    SecAgg+ splits a node's mask seed and key into shares; any `threshold` of them rebuild it,
    so a server that colludes with threshold - 1 other nodes can unmask this node's update. The
    node refuses a round whose threshold is below this number.
    """
    value = node_config.get(SECAGG_MIN_THRESHOLD, 2)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ConfigError(
            f"node config {SECAGG_MIN_THRESHOLD}={value!r} must be an integer >= 2, e.g. "
            f"{SECAGG_MIN_THRESHOLD}=3 (no fewer than 3 shares may rebuild this node's keys)"
        )
    return value


def default_state_dir() -> Path:
    """$FEDPEFT_STATE_DIR, else $XDG_STATE_HOME/fedpeft, else ~/.local/state/fedpeft."""
    if os.environ.get("FEDPEFT_STATE_DIR"):
        return Path(os.environ["FEDPEFT_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "fedpeft"


def _positive(key: str, value: object, upper: float | None = None) -> float:
    if not finite_number(value) or value <= 0 or (upper is not None and value >= upper):
        bound = f" and below {upper:g}" if upper is not None else ""
        raise ConfigError(
            f"node config {key}={value!r} must be a number above 0{bound}, e.g. {key}=3.0"
        )
    return float(value)


@dataclass(frozen=True)
class NodePolicy:
    """The floor a node holds every task to (None: no limit on that field)."""

    required: bool = False
    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    noise_multiplier: float | None = None
    state_dir: Path = Path()
    allow_reproducible: bool = False
    accountant: str = "prv"
    lifetime_epsilon: float | None = None
    #: a SuperNode (reads only what its node config names) rather than a simulated node
    deployed: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """A deployed node's policy from its node config; reproducible noise is never allowed."""
        required = node_config.get(REQUIRED, False)
        if not isinstance(required, bool):
            raise ConfigError(f"node config {REQUIRED}={required!r} must be true or false")
        numbers = {
            key: _positive(key, node_config[key], 1.0 if key == DELTA else None)
            for key in (EPSILON, DELTA, MAX_GRAD_NORM, NOISE_MULTIPLIER, LIFETIME_EPSILON)
            if key in node_config
        }
        if required and EPSILON not in numbers:
            raise ConfigError(
                f"node config {REQUIRED}=true without {EPSILON} sets no limit on epsilon: add "
                f"{EPSILON}=<the most this node spends in a run>, e.g. {EPSILON}=3"
            )
        if LIFETIME_EPSILON in numbers and EPSILON not in numbers:
            raise ConfigError(
                f"node config {LIFETIME_EPSILON} needs {EPSILON} (the most one run may spend), "
                f"e.g. {EPSILON}=3 {LIFETIME_EPSILON}=9"
            )
        lifetime = numbers.get(LIFETIME_EPSILON, numbers.get(EPSILON))
        if lifetime is not None and lifetime < numbers[EPSILON]:
            raise ConfigError(
                f"node config {LIFETIME_EPSILON}={lifetime:g} is below {EPSILON}="
                f"{numbers[EPSILON]:g}: the lifetime cap must allow at least one run"
            )
        accountant = node_config.get(ACCOUNTANT, "prv")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"node config {ACCOUNTANT}={accountant!r} is unknown: choose one of "
                f"{', '.join(ACCOUNTANTS)}"
            )
        secagg_required(node_config)  # read by clients/secure_sum_mods.py; refused here if bad
        secagg_min_threshold(node_config)  # likewise
        state_dir = node_config.get(STATE_DIR)
        if state_dir is not None and (not isinstance(state_dir, str) or not state_dir.strip()):
            raise ConfigError(
                f"node config {STATE_DIR}={state_dir!r} must be a directory path, e.g. "
                f'{STATE_DIR}="/var/lib/fedpeft"'
            )
        return cls(
            required=required or EPSILON in numbers,
            epsilon=numbers.get(EPSILON),
            delta=numbers.get(DELTA),
            max_grad_norm=numbers.get(MAX_GRAD_NORM),
            noise_multiplier=numbers.get(NOISE_MULTIPLIER),
            state_dir=Path(state_dir).expanduser() if state_dir else default_state_dir(),
            accountant=accountant,
            lifetime_epsilon=lifetime,
            deployed=True,
        )

    @classmethod
    def for_simulation(cls, dp: Mapping[str, Any], state_dir: Path) -> NodePolicy:
        """The policy every simulated node holds: the run's own `dp` group, ledgers in state_dir."""
        if not dp.get("enabled", False):
            return cls(state_dir=state_dir)
        return cls(
            required=True,
            epsilon=float(dp["target_epsilon"]),
            delta=None if dp.get("delta") is None else float(dp["delta"]),
            max_grad_norm=float(dp["max_grad_norm"]),
            noise_multiplier=(
                None if dp.get("noise_multiplier") is None else float(dp["noise_multiplier"])
            ),
            state_dir=state_dir,
            allow_reproducible=bool(dp.get("reproducible", False)),
            accountant=str(dp.get("accountant", "prv")),
            lifetime_epsilon=float(dp["target_epsilon"]),
        )

    def check(self, settings: DPSettings, has_ledger: bool) -> None:
        """Raise PolicyViolation naming the field if `settings` (the task's) are weaker."""
        if not settings.enabled:
            if self.required:
                field = (
                    f"{REQUIRED}=true" if self.epsilon is None else f"{EPSILON}={self.epsilon:g}"
                )
                raise PolicyViolation(
                    f"node policy {field} refuses a task with dp.enabled=false: this node trains "
                    "only under DP-SGD; start the run with dp=eps1|eps3|eps6|custom"
                )
            if has_ledger:
                raise PolicyViolation(
                    "this node already spent privacy budget in this run, so it refuses a task "
                    "with dp.enabled=false: a private run stays private"
                )
            return
        if settings.reproducible and not self.allow_reproducible:
            raise PolicyViolation(
                "this node refuses dp.reproducible=true: reproducible noise is seeded from the "
                "run's seed, which the server knows (it could regenerate and subtract the noise); "
                "it exists for simulations only"
            )
        if settings.accountant != self.accountant:
            raise PolicyViolation(
                f"node policy {ACCOUNTANT}={self.accountant} refuses the task's dp.accountant="
                f"{settings.accountant}: this node calibrates and counts its spending with its own "
                f"accountant; start the run with dp.accountant={self.accountant}"
            )
        self._at_most(EPSILON, "dp.target_epsilon", settings.target_epsilon, self.epsilon)
        if settings.delta is not None:
            self._at_most(DELTA, "dp.delta", settings.delta, self.delta)
        self._at_most(MAX_GRAD_NORM, "dp.max_grad_norm", settings.max_grad_norm, self.max_grad_norm)
        if settings.noise_multiplier is not None:
            self.check_noise(settings.noise_multiplier, "dp.noise_multiplier")

    def check_delta(self, delta: float) -> None:
        """Refuse a delta (the task's, or the per-client default) above the policy's."""
        self._at_most(DELTA, "dp.delta", delta, self.delta)

    def check_noise(self, sigma: float, what: str = "the calibrated noise multiplier") -> None:
        """Refuse a noise multiplier below the policy's minimum."""
        if not (math.isfinite(sigma) and sigma > 0):
            raise PolicyViolation(f"this node refuses {what}={sigma!r}: noise must be above 0")
        if self.noise_multiplier is not None and not sigma >= self.noise_multiplier * (1 - _SLACK):
            raise PolicyViolation(
                f"node policy {NOISE_MULTIPLIER}={self.noise_multiplier:g} refuses {what}="
                f"{sigma:.4g}: this node needs at least that much noise; lower the target "
                "epsilon or plan more steps"
            )

    @staticmethod
    def _at_most(key: str, task_field: str, value: float, limit: float | None) -> None:
        if not math.isfinite(value):
            raise PolicyViolation(
                f"this node refuses the task's {task_field}={value!r}: it must be a finite number"
            )
        if limit is not None and not value <= limit * (1 + _SLACK):
            raise PolicyViolation(
                f"node policy {key}={limit:g} refuses the task's {task_field}={value:g}: this "
                f"node accepts at most {limit:g}; start the run with {task_field}<={limit:g}"
            )
