"""`DatasetSpec`: the `dataset` config group validated into a hashable value, and its parser."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedpeft.data.locations import cache_dir, data_root
from fedpeft.errors import ConfigError

SOURCES = ("spamassassin", "sst2", "banking77", "trec", "files", "hf", "gsm8k", "jsonl")


@dataclass(frozen=True)
class DatasetSpec:
    """Hashable, validated view of the `dataset` config group (the key of the load cache)."""

    name: str
    location: str
    text_column: str
    label_column: str
    test_fraction: float | None
    validation_fraction: float | None
    max_train_examples: int | None
    max_test_examples: int | None
    subset: str | None
    train_split: str
    test_split: str | None
    seed: int


def parse_spec(cfg: Mapping, seed: int) -> DatasetSpec:
    c = plain_config(cfg)
    name = c.get("name")
    if name not in SOURCES:
        raise ConfigError(
            f"dataset.name={name!r} is not a known source: use one of {', '.join(SOURCES)} "
            "(e.g. dataset=sst2)"
        )
    path = _opt(c, "path")
    if name == "spamassassin":
        location = str(Path(path).expanduser().resolve()) if path else f"npm:{cache_dir()}"
    elif name in ("files", "hf", "jsonl"):
        if not path:
            raise ConfigError(
                f"dataset.path is required for dataset={name}: pass dataset.path="
                + ("<hub id or local dataset dir>" if name == "hf" else "/path/to/file_or_dir")
            )
        location = str(path) if name == "hf" else str(Path(path).expanduser().resolve())
    else:
        location = str(data_root(name, path).resolve())
    return DatasetSpec(
        name=name,
        location=location,
        text_column=str(_opt(c, "text_column") or "text"),
        label_column=str(_opt(c, "label_column") or "label"),
        test_fraction=_fraction(_opt(c, "test_fraction"), "test_fraction"),
        validation_fraction=_fraction(_opt(c, "validation_fraction"), "validation_fraction"),
        max_train_examples=_positive_int(_opt(c, "max_train_examples"), "max_train_examples"),
        max_test_examples=_positive_int(_opt(c, "max_test_examples"), "max_test_examples"),
        subset=_opt(c, "subset"),
        train_split=str(_opt(c, "train_split") or "train"),
        test_split=_opt(c, "test_split"),
        seed=int(seed),
    )


def plain_config(cfg: Mapping) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return dict(cfg)


def _opt(c: Mapping, key: str) -> Any:
    value = c.get(key)
    return None if value in (None, "???", "") else value


def _fraction(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"dataset.{field} must be a number in (0, 1) or null, got {value!r}")
    return float(value)


def _positive_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dataset.{field} must be a positive integer or null, got {value!r}")
    return value
