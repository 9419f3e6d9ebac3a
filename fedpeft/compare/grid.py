"""Expand Hydra sweep overrides (`key=a,b,c`) into the grid's runs, each with a stable folder name.

A run's identity is a hash of its composed config, so the same run is found again however its
overrides are spelled or ordered, and when a key that had one value becomes a sweep.

Hydra's own override parser and BasicSweeper do the parsing and the cartesian product, so every
sweep form Hydra knows for a discrete choice works: `seed=0,1,2`, `seed=range(3)`,
`strategy=choice(fedavg,fedsvd)`; lists (`strategy.params.ranks=[8,4]`) stay single values.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from fedpeft.client_pool import federation_pool_size
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError

#: longest readable part of a run folder's name; the config hash keeps it unique
MAX_SLUG = 100
#: config keys that do not change a run's result, left out of its hash (turning the trackers on
#: for a finished study must not run it again)
IGNORED = ("run_dir", "verbose", "tracking")
#: Config keys added after studies had run, each with the test that its value leaves a run as it
#: ran before the key existed (given the whole config); such a value is left out of the hash, so
#: that a finished study resumes "already done" after an upgrade instead of running again. A new
#: key whose default reproduces earlier runs is added here (tests/compare/test_grid.py pins older
#: digests).
NEUTRAL: dict[str, Callable[[Any, Mapping[str, Any]], bool]] = {
    "client_dp": lambda group, cfg: not group.get("enabled"),
    "secagg": lambda group, cfg: not group.get("enabled"),
    "federation.pool_size": lambda size, cfg: size is None and _pooled_as_before(cfg),
}


def _pooled_as_before(cfg: Mapping[str, Any]) -> bool:
    """Whether a pooled run repeats the run a node per client gave (client_pool.py).

    Fixed-size sampling draws the same clients either way (tested); client-level DP's Poisson
    cohorts come from another draw, and a pooled FedSA-LoRA scores other clients.
    """
    fed = cfg["federation"]
    poisson = bool((cfg.get("client_dp") or {}).get("enabled"))
    if federation_pool_size(fed, poisson) >= fed["num_clients"]:  # a node per client
        return True
    return not poisson and cfg["strategy"]["name"] != "fedsa_lora"


@dataclass(frozen=True)
class Run:
    """One grid point: its overrides, the swept values that tell it apart, its folder name."""

    overrides: tuple[str, ...]
    swept: tuple[tuple[str, str], ...]
    digest: str

    @property
    def name(self) -> str:
        """`<swept values>-<config hash>`, the run folder's name."""
        return f"{slug(self.swept)}-{self.digest}"

    @property
    def values(self) -> dict[str, str]:
        """Swept key -> this run's value."""
        return dict(self.swept)

    def folder(self, out_dir: Path) -> Path:
        """The run folder under out_dir, or a finished folder of the same config named otherwise."""
        folder = out_dir / self.name
        if not folder.is_dir():
            done = sorted(out_dir.glob(f"*-{self.digest}/summary.json"))
            if done:
                return done[0].parent
        return folder


def _parse(overrides: Sequence[str]) -> list:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"bad override ({first}): use key=value or key=a,b,c") from exc


def _key(override: str) -> str:
    return _parse([override])[0].get_key_element()


def merge(*lists: Sequence[str]) -> list[str]:
    """Concatenate override lists, a later value of the same key replacing an earlier one."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            merged[_key(override)] = override
    return list(merged.values())


def slug(swept: Sequence[tuple[str, str]]) -> str:
    """`key-value__key-value`: the strategy first, the seed last, other keys alphabetically."""
    order = sorted(swept, key=lambda kv: (kv[0] != "strategy", kv[0] == "seed", kv[0]))
    text = "__".join(f"{k}-{v}" for k, v in order) or "run"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text)[:MAX_SLUG]


def config_digest(cfg: DictConfig) -> str:
    """A short hash of the composed config, without the keys that do not change a run's result."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED:
        plain.pop(key, None)
    drop = []
    for dotted, neutral in NEUTRAL.items():  # decided on the whole config, then dropped
        *parents, key = dotted.split(".")
        group = plain
        for parent in parents:
            group = group.get(parent) or {}
        if key in group and neutral(group[key], plain):
            drop.append((group, key))
    for group, key in drop:
        del group[key]
    return hashlib.sha1(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:10]


def expand(
    overrides: Sequence[str], per_strategy: Mapping[str, Sequence[str]] | None = None
) -> list[Run]:
    """Every combination of the swept values, each checked by composing its config.

    `per_strategy` adds overrides to the runs of one strategy (a study's `strategy_overrides`),
    unless the grid's own overrides already set that key. A bad value in any run raises a
    ConfigError before anything runs.
    """
    parsed = _parse(overrides)
    for override in parsed:
        if override.get_key_element() == "run_dir":
            raise ConfigError("run_dir= is set by compare for every run: use out_dir= instead")
    swept_keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    given = {o.get_key_element() for o in parsed}
    try:
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as exc:
        raise ConfigError(f"{exc}: sweep discrete values, e.g. seed=0,1,2") from exc
    runs = []
    for combo in batch:
        named = [o.split("=", 1)[1] for o in combo if _key(o) == "strategy"]
        strategy = named[-1] if named else compose_config(combo).strategy.name
        extra = [o for o in (per_strategy or {}).get(strategy, []) if _key(o) not in given]
        if extra:  # before composing: a strategy may need them to be valid at all
            combo = merge(combo, extra)
        cfg = compose_config(combo)
        by_key = {_key(o): o.split("=", 1)[1] for o in combo}
        swept = tuple((k, by_key[k]) for k in swept_keys)
        runs.append(Run(tuple(combo), swept, config_digest(cfg)))
    digests = [r.digest for r in runs]
    if len(set(digests)) != len(digests):
        raise ConfigError("the grid repeats a run: list each swept value once")
    return runs
