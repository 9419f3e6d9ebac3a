"""The `dp` config group as a typed record, and its validation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedpeft.errors import ConfigError
from fedpeft.schema import finite_number, integer_in

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "ghost")
MAX_DELTA = 1e-5


#: Upper bounds a private task's numbers must stay within (beyond them DP means nothing, or a
#: value is a typo or an attack): epsilon, clipping bound, noise multiplier, planned rounds.
MAX_EPSILON = 100.0
MAX_GRAD_NORM = 1e4
MAX_NOISE_MULTIPLIER = 1e4
MAX_PLANNED_ROUNDS = 1_000_000
MAX_PHYSICAL_BATCH = 1_000_000


def within(value: object, low: float, high: float) -> bool:
    """`value` a finite number with low < value <= high."""
    return finite_number(value) and low < value <= high


@dataclass(frozen=True)
class DPSettings:
    """One client's DP-SGD settings, as the task carries them (`dp` group plus planned rounds).

    `noise_multiplier` None means: calibrate it per client so the planned run ends at
    `target_epsilon`; `delta` None means the per-client default (see `default_delta`);
    `planned_rounds` is how many rounds each client is expected to train in; `reproducible`
    seeds the Poisson sampler and the noise from the run's seed (research runs only: whoever
    knows the seed can remove the noise).
    """

    enabled: bool = False
    target_epsilon: float = 3.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    max_physical_batch_size: int | None = None
    planned_rounds: int = 1
    reproducible: bool = False

    @classmethod
    def parse(cls, raw: object, where: str = "dp") -> DPSettings:
        """Validate a `dp` mapping into settings; fail closed on anything unexpected.

        Unknown or missing keys, wrong types, NaN or inf, values out of range, a noise multiplier
        of 0 and accountants outside ACCOUNTANTS are refused with a ConfigError naming the key.
        A server's task and a user's config go through this same check.
        """
        known = {f.name for f in fields(cls)}
        values = enabled_settings(
            raw,
            known,
            where,
            "DP settings",
            "a private task states every DP setting (a missing one is refused, never defaulted)",
        )
        if values is None:
            return cls()
        checks = [
            (
                "target_epsilon",
                within(values["target_epsilon"], 0.0, MAX_EPSILON),
                f"a finite number in (0, {MAX_EPSILON:g}], e.g. 3",
            ),
            (
                "delta",
                values["delta"] is None
                or within(values["delta"], 0.0, 1.0)
                and values["delta"] < 1,
                "a finite number in (0, 1), e.g. 1e-5 (or null for 1/n per client)",
            ),
            (
                "max_grad_norm",
                within(values["max_grad_norm"], 0.0, MAX_GRAD_NORM),
                f"a finite number in (0, {MAX_GRAD_NORM:g}], e.g. 1.0",
            ),
            (
                "noise_multiplier",
                values["noise_multiplier"] is None
                or within(values["noise_multiplier"], 0.0, MAX_NOISE_MULTIPLIER),
                f"a finite number in (0, {MAX_NOISE_MULTIPLIER:g}] (or null to calibrate); "
                "0 would be no noise at all",
            ),
            (
                "accountant",
                values["accountant"] in ACCOUNTANTS,
                f"one of {', '.join(ACCOUNTANTS)}",
            ),
            (
                "grad_sample_mode",
                values["grad_sample_mode"] in GRAD_SAMPLE_MODES,
                f"one of {', '.join(GRAD_SAMPLE_MODES)}",
            ),
            (
                "max_physical_batch_size",
                values["max_physical_batch_size"] is None
                or integer_in(values["max_physical_batch_size"], 1, MAX_PHYSICAL_BATCH),
                "an integer >= 1 (or null for no cap)",
            ),
            (
                "planned_rounds",
                integer_in(values["planned_rounds"], 1, MAX_PLANNED_ROUNDS),
                "an integer >= 1 (or null: rounds x expected participation)",
            ),
            ("reproducible", isinstance(values["reproducible"], bool), "true or false"),
        ]
        check_values(where, values, checks)
        numbers = ("target_epsilon", "delta", "max_grad_norm", "noise_multiplier")
        return cls(
            **{k: float(v) if k in numbers and v is not None else v for k, v in values.items()}
        )

    @classmethod
    def from_task(cls, task: Mapping[str, Any]) -> DPSettings:
        """The settings in a task dict (disabled when the task has none), checked by `parse`."""
        return cls.parse(task.get("dp") or {}, "dp")


def enabled_settings(
    raw: object, known: set[str], where: str, kind: str, missing_note: str
) -> dict[str, Any] | None:
    """A DP group's values when enabled, None when disabled; fail closed on its shape.

    A non-mapping, unknown keys (even when disabled), a non-bool `enabled` and, when enabled, any
    missing key raise a ConfigError naming `where` and the `kind` of settings.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of {kind}, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {', '.join(unknown)}: the {kind} are "
            f"{', '.join(sorted(known))}"
        )
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled={enabled} must be true or false")
    if not enabled:
        return None
    missing = sorted(known - set(raw))
    if missing:
        raise ConfigError(f"{where} has enabled=true but no {', '.join(missing)}: {missing_note}")
    return dict(raw)


def check_values(
    where: str, values: Mapping[str, Any], checks: list[tuple[str, bool, str]]
) -> None:
    """Raise a ConfigError for the first (key, ok, expected) check that failed, naming the key."""
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{where}.{key}={values[key]} must be {expected}")


def default_delta(num_examples: int) -> float:
    """1 / n rounded down to a power of ten, never above 1e-5 (docs/algorithms.md)."""
    if num_examples < 1:
        raise ConfigError("a client with no training examples cannot run DP-SGD")
    return min(MAX_DELTA, 10.0 ** math.floor(-math.log10(num_examples)))


def validate_dp(cfg: DictConfig) -> None:
    """Check the `dp` group; the first problem raises a ConfigError naming the key and a fix."""
    dp = cfg.dp
    if not dp.get("enabled", False):
        return
    if cfg.get("resume"):
        raise ConfigError(
            f"resume={cfg.resume} cannot continue a DP run: each client's privacy ledger lives in "
            "the run's node state and would restart at zero; start a new run instead"
        )
    plain = OmegaConf.to_container(dp, resolve=True)
    assert isinstance(plain, dict)
    if plain.get("planned_rounds") is None:
        plain["planned_rounds"] = 1  # derived from the federation when the task is built
    DPSettings.parse(plain, "dp")
