"""Named studies: a grid saved as YAML under fedpeft/configs/study/, run by `compare study=<name>`.

A study file holds `description`, `overrides` (a list; comma lists sweep, as on the command line),
optionally `strategy_overrides` (strategy name -> overrides for that strategy's runs only),
`target` (the accuracy for "rounds to target"), `out_dir` and `tune` (compare/tuning.py's
TuneSettings as a mapping: every method tuned on a validation split before its final runs).
`study=` also takes a path to such a file, so users keep their own studies next to their data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpeft.config import CONFIG_DIR
from fedpeft.errors import ConfigError

STUDY_DIR = CONFIG_DIR / "study"
KEYS = {"description", "overrides", "strategy_overrides", "target", "out_dir", "tune"}


@dataclass
class Study:
    """A named grid and how to summarise it."""

    name: str
    description: str
    overrides: list[str]
    strategy_overrides: dict[str, list[str]] = field(default_factory=dict)
    target: float | None = None
    out_dir: str | None = None
    tune: dict[str, Any] | None = None


def study_names() -> list[str]:
    """The packaged studies."""
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study(name_or_path: str) -> Study:
    """A packaged study by name, or a study YAML by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = STUDY_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"study={name_or_path} is unknown: choose one of {', '.join(study_names())} "
            "or give the path of a study .yaml file"
        )
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"study file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("overrides"), list):
        raise ConfigError(f"study file {path} needs a list `overrides:` of key=value lines")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ConfigError(f"study file {path}: unknown key {unknown[0]!r}, use {sorted(KEYS)}")
    per_strategy = raw.get("strategy_overrides") or {}
    tune = raw.get("tune")
    if tune is not None and not isinstance(tune, dict):
        raise ConfigError(f"study file {path}: tune must be a mapping, e.g. tune: {{trials: 8}}")
    return Study(
        name=path.stem,
        description=str(raw.get("description", "")).strip(),
        overrides=[str(o) for o in raw["overrides"]],
        strategy_overrides={str(k): [str(o) for o in v] for k, v in per_strategy.items()},
        target=None if raw.get("target") is None else float(raw["target"]),
        out_dir=raw.get("out_dir"),
        tune=tune,
    )
