"""The run folder: resolved config, per-round history, summary, final adapter and plots."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

HISTORY_FIELDS = (
    "round",
    "accuracy",
    "loss",
    "macro_f1",
    "train_loss",
    "bytes_up",
    "bytes_down",
    "round_time_s",
    "aggregate_time_s",
    "wall_time_s",
    # CPU seconds of the clients' local training, summed over the round's accepted replies
    "client_seconds",
    "sampled",
    "replied",
    "failed",
    "rejected",
    "max_epsilon",
    # client-level DP (client_dp): the run's client-level epsilon so far, the bound clipped to
    "client_level_epsilon",
    "clip_norm",
    "client_train_loss",
    "client_epsilon",
    "failures",
    # personalised methods (FedSA-LoRA): accuracy is then the unweighted mean over clients
    "accuracy_weighted",
    "accuracy_min",
    "eval_clients",
    "eval_bytes_down",
    # ||Delta|| of the averaged tensors, and the expected norm of its DP noise (plain-SGD DP runs)
    "update_norm",
    "dp_noise_norm",
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    """Writes one run's outputs as it goes, so a crashed run still leaves its history."""

    def __init__(self, path: str | Path, cfg: DictConfig):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        _atomic_write(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    @property
    def adapter_dir(self) -> Path:
        """Where the global adapter is saved in peft's format."""
        return self.path / "adapter"

    def record_round(self, row: Mapping[str, Any]) -> None:
        """Append one round's row and rewrite history.csv."""
        self.rows.append(dict(row))
        self._write_history()

    def restore(self, rows: list[Mapping[str, Any]]) -> None:
        """Continue from a checkpoint's rows: history.csv is rewritten from them."""
        self.rows = [dict(r) for r in rows]
        self._write_history()

    def _write_history(self) -> None:
        lines = [
            {k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()}
            for r in self.rows
        ]
        tmp = self.path / ".history.csv.tmp"
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(lines)
        os.replace(tmp, self.path / "history.csv")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """summary.json, the contract other tools read."""
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def plot_accuracy(self, title: str) -> Path:
        """accuracy.png: held-out accuracy per evaluated round (round 0: the untrained adapter)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        evaluated = [r for r in self.rows if r.get("accuracy") is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["round"] for r in evaluated], [r["accuracy"] for r in evaluated], marker="o")
        ax.set(xlabel="round", ylabel="held-out accuracy", title=title, ylim=(0, 1))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "accuracy.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out
