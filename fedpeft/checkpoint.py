"""The server's whole state after each round, written atomically into the run folder, for resume.

<run_dir>/checkpoint/ holds `tensors-<round>.pt` (torch.save of the strategy's tensors: the global
adapter and method state such as FLoRA's stacked modules) and `state.json` (the round, the
strategy's JSON state with its sampling RNG, the history rows, byte totals, elapsed time and the
resolved config). Each file is written to a temporary name, flushed to disk and renamed over the
old one; `state.json` is renamed last and names its tensor file, so a crash at any point leaves
the previous round's checkpoint whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf

from fedpeft.errors import ConfigError

DIR = "checkpoint"
STATE = "state.json"
#: Config keys a resumed run may change: they do not alter what the rounds compute.
RESUMABLE_CHANGES = (
    "resume",
    "run_dir",
    "verbose",
    "federation.rounds",
    "federation.round_timeout",
    "federation.client_cpus",
    "federation.client_gpus",
    "eval.every",
    "federation.stop_at",
    "tracking",
)


@dataclass
class Checkpoint:
    """One completed round's server state."""

    server_round: int
    tensors: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    rows: list[dict[str, Any]]
    totals: dict[str, float]
    config: dict[str, Any]


def _write_atomic(path: Path, write) -> None:  # noqa: ANN001
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` into <run_dir>/checkpoint/ atomically and drop older tensor files."""
    folder = Path(run_dir) / DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tensors-{ckpt.server_round:05d}.pt"
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()}
    _write_atomic(folder / name, lambda fh: torch.save(tensors, fh))
    state = {
        "server_round": ckpt.server_round,
        "tensors": name,
        "strategy": ckpt.strategy,
        "rows": ckpt.rows,
        "totals": ckpt.totals,
        "config": ckpt.config,
    }
    text = json.dumps(state, indent=1).encode()
    _write_atomic(folder / STATE, lambda fh: fh.write(text))
    for old in folder.glob("tensors-*.pt"):
        if old.name != name:
            old.unlink()
    return folder / STATE


def load(run_dir: str | Path) -> Checkpoint:
    """The last completed round's checkpoint in `run_dir`; a missing one is a ConfigError."""
    path = Path(run_dir) / DIR / STATE
    if not path.is_file():
        raise ConfigError(
            f"resume={run_dir} holds no checkpoint ({DIR}/{STATE}): pass the run folder of a run "
            "that completed at least one round"
        )
    try:
        state = json.loads(path.read_text())
        tensors = torch.load(path.parent / state["tensors"], weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"resume={run_dir}: the checkpoint cannot be read ({exc})") from exc
    return Checkpoint(
        server_round=int(state["server_round"]),
        tensors=tensors,
        strategy=state["strategy"],
        rows=state["rows"],
        totals=state["totals"],
        config=state["config"],
    )


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, as the checkpoint stores it."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return plain


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resumable(ckpt: Checkpoint, cfg: DictConfig) -> None:
    """Raise a ConfigError unless `cfg` continues the checkpointed run with more rounds."""
    saved, now = _flatten(ckpt.config), _flatten(plain_config(cfg))
    for key in sorted(set(saved) | set(now)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if key not in saved:
            log(WARNING, "resume: %s=%s is newer than the checkpoint; using it", key, now[key])
            continue
        if saved.get(key) != now.get(key):
            raise ConfigError(
                f"resume: {key}={now.get(key)} but the checkpointed run has {key}="
                f"{saved.get(key)}: pass the run's original overrides (see its config.yaml)"
            )
    rounds = cfg.federation.rounds
    if rounds <= ckpt.server_round:
        raise ConfigError(
            f"resume: the run already completed {ckpt.server_round} rounds; set "
            f"federation.rounds above {ckpt.server_round} to continue it"
        )
