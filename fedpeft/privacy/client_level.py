"""Client-level DP (DP-FedAvg): its settings, its noise calibration and its accountant.

The unit protected is a client's whole contribution, as on phones where a client is one person
(McMahan et al., ICLR 2018). Each sampled client's update is clipped to a norm bound C, the
server adds Gaussian noise of standard deviation z C to the sum and divides by the expected
cohort; clients are Poisson-sampled with rate q, so the run is a subsampled Gaussian mechanism
composed over rounds, accounted by Opacus' RDP or PRV accountant on (z, q, rounds). Adaptive
clipping (Andrew et al., NeurIPS 2021) moves C towards a quantile of the update norms from a
noisy count of clipped clients; that count is a second Gaussian query, paid for by splitting the
noise: z_update^-2 + (2 sigma_count)^-2 = z^-2 (docs/privacy.md, "Client-level DP").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedpeft.errors import ConfigError
from fedpeft.privacy.calibration import calibrate_noise
from fedpeft.privacy.ledger import spent_epsilon
from fedpeft.privacy.settings import (
    ACCOUNTANTS,
    MAX_DELTA,
    MAX_EPSILON,
    MAX_NOISE_MULTIPLIER,
    check_values,
    enabled_settings,
    within,
)
from fedpeft.schema import finite_number

CLIPPINGS = ("fixed", "adaptive")
#: Largest clipping bound accepted (an update norm of a LoRA adapter is far below it).
MAX_CLIP_NORM = 1e6


@dataclass(frozen=True)
class ClientDPSettings:
    """The `client_dp` group: DP-FedAvg's noise, clipping and accountant, as the server runs it.

    `noise_multiplier` None calibrates z so the planned rounds end at `target_epsilon`;
    `delta` None takes the largest power of ten below 1/N (N the population), at most 1e-5.
    `clip_norm` is the fixed bound, or adaptive clipping's starting bound; `target_quantile`,
    `clip_lr` and `count_stddev` (None: expected cohort / 20, Andrew et al.'s choice) drive the
    adaptive rule. `reproducible` seeds the server's noise from the run's seed (research only).
    """

    enabled: bool = False
    target_epsilon: float = 3.0
    delta: float | None = None
    noise_multiplier: float | None = None
    clipping: str = "adaptive"
    clip_norm: float = 0.1
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None
    accountant: str = "rdp"
    reproducible: bool = False

    @classmethod
    def parse(cls, raw: object, where: str = "client_dp") -> ClientDPSettings:
        """Validate a `client_dp` mapping: unknown keys, NaN, inf and out-of-range are refused."""
        v = enabled_settings(
            raw,
            {f.name for f in fields(cls)},
            where,
            "client-level DP settings",
            "state every setting (client_dp=custom lists them)",
        )
        if v is None:
            return cls()
        checks = [
            (
                "target_epsilon",
                within(v["target_epsilon"], 0, MAX_EPSILON),
                f"in (0, {MAX_EPSILON:g}]",
            ),
            (
                "delta",
                v["delta"] is None or (within(v["delta"], 0, 1) and v["delta"] < 1),
                "in (0, 1), e.g. 1e-6 (or null for 1/N)",
            ),
            (
                "noise_multiplier",
                v["noise_multiplier"] is None
                or within(v["noise_multiplier"], 0, MAX_NOISE_MULTIPLIER),
                f"in (0, {MAX_NOISE_MULTIPLIER:g}] (or null to calibrate to target_epsilon)",
            ),
            ("clipping", v["clipping"] in CLIPPINGS, f"one of {', '.join(CLIPPINGS)}"),
            ("clip_norm", within(v["clip_norm"], 0, MAX_CLIP_NORM), f"in (0, {MAX_CLIP_NORM:g}]"),
            (
                "target_quantile",
                finite_number(v["target_quantile"]) and 0 <= v["target_quantile"] <= 1,
                "a quantile in [0, 1], e.g. 0.5",
            ),
            ("clip_lr", within(v["clip_lr"], 0, 10), "in (0, 10], e.g. 0.2"),
            (
                "count_stddev",
                v["count_stddev"] is None or within(v["count_stddev"], 0, 1e9),
                "positive (or null: expected cohort / 20)",
            ),
            ("accountant", v["accountant"] in ACCOUNTANTS, f"one of {', '.join(ACCOUNTANTS)}"),
            ("reproducible", isinstance(v["reproducible"], bool), "true or false"),
        ]
        check_values(where, v, checks)
        numbers = (
            "target_epsilon",
            "delta",
            "noise_multiplier",
            "clip_norm",
            "target_quantile",
            "clip_lr",
            "count_stddev",
        )
        return cls(**{k: float(x) if k in numbers and x is not None else x for k, x in v.items()})


@dataclass(frozen=True)
class ClientNoise:
    """The calibrated mechanism: z of the whole round, its split, the sampling and delta.

    `noise_multiplier` z is what the accountant composes; the update sum gets `update_multiplier`
    x C and the clipped count `count_stddev` (both z when clipping is fixed, and count 0).
    """

    noise_multiplier: float
    update_multiplier: float
    count_stddev: float
    sample_rate: float
    population: int
    delta: float
    accountant: str

    @property
    def expected_cohort(self) -> float:
        """Expected cohort q N: the noisy mean's fixed denominator (McMahan et al.'s f~_f)."""
        return self.sample_rate * self.population

    @classmethod
    def calibrate(
        cls, settings: ClientDPSettings, *, population: int, sample_rate: float, rounds: int
    ) -> ClientNoise:
        """Calibrate z for `rounds` rounds at Poisson rate `sample_rate` over `population`."""
        if population < 1 or rounds < 1 or not 0 < sample_rate <= 1:
            raise ConfigError(
                f"client-level DP needs a population >= 1, rounds >= 1 and a sampling rate in "
                f"(0, 1] (got {population}, {rounds}, {sample_rate})"
            )
        delta = settings.delta if settings.delta is not None else population_delta(population)
        if delta >= 1 / population:
            raise ConfigError(
                f"client_dp.delta={delta:g} is not below 1/N = 1/{population}: a delta that "
                f"large allows publishing one client's data outright; use client_dp.delta=null "
                f"for {population_delta(population):g}"
            )
        z = settings.noise_multiplier
        if z is None:
            z = calibrate_noise(
                settings.target_epsilon, delta, sample_rate, rounds, settings.accountant
            )
        expected = sample_rate * population
        if settings.clipping == "fixed":
            return cls(z, z, 0.0, sample_rate, population, delta, settings.accountant)
        count = settings.count_stddev if settings.count_stddev is not None else expected / 20
        if z >= 2 * count:
            raise ConfigError(
                f"client_dp.clipping=adaptive needs the clipped count's noise 2 x count_stddev "
                f"= {2 * count:g} above the run's noise multiplier z = {z:.3g}, since "
                f"z_update^-2 = z^-2 - (2 count_stddev)^-2; sample more clients per round "
                f"(expected cohort {expected:g}), set client_dp.count_stddev above {z / 2:.3g}, "
                "or use client_dp.clipping=fixed"
            )
        count, update = compute_adaptive_noise_params(z, expected, count)
        return cls(
            z, float(update), float(count), sample_rate, population, delta, settings.accountant
        )

    def epsilon(self, rounds: int) -> float:
        """Client-level epsilon at `delta` after `rounds` rounds of this mechanism."""
        if rounds <= 0:
            return 0.0
        return spent_epsilon(
            self.accountant, ((self.noise_multiplier, self.sample_rate, rounds),), self.delta
        )


def population_delta(population: int) -> float:
    """The largest power of ten strictly below 1 / N, at most 1e-5 (client_dp.delta=null)."""
    return min(MAX_DELTA, 10.0 ** -(math.floor(math.log10(population)) + 1))


def adaptive_clip_step(
    clip_norm: float, noisy_unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """Andrew et al.'s geometric update: C exp(-lr (b~ - gamma)), b~ the fraction not clipped."""
    return clip_norm * math.exp(-lr * (noisy_unclipped_fraction - target_quantile))
