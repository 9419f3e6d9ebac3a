"""The Flower ServerApp: runs the rounds, evaluates, and writes the run folder."""

from __future__ import annotations

import shlex
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedpeft.config import compose_config
from fedpeft.federation import Federation, prepare
from fedpeft.run_folder import RunFolder

app = ServerApp()


def default_run_dir(cfg: DictConfig) -> Path:
    """runs/<date>-<time>-<strategy> under the working directory, unless run_dir= is given."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.strategy.name}"


def _row(server_round: int, metrics: dict[str, float], fed: Federation, **extra: Any) -> dict:
    stats = fed.strategy.stats
    eps = stats.client_epsilon
    return {
        "round": server_round,
        **metrics,
        "train_loss": stats.train_loss,
        "bytes_up": stats.bytes_up,
        "bytes_down": stats.bytes_down,
        "aggregate_time_s": round(stats.aggregate_s, 6),
        "sampled": stats.sampled,
        "replied": stats.replied,
        "failed": len(stats.failed),
        "rejected": len(stats.rejected),
        "max_epsilon": max(eps.values()) if eps else None,
        "client_train_loss": {str(k): round(v, 5) for k, v in stats.client_loss.items()},
        "client_epsilon": {str(k): v for k, v in eps.items()},
        **extra,
    }


def run_federation(
    grid: Grid, fed: Federation, run_dir: Path, console: Console | None = None
) -> dict:
    """Run every round on `grid`, evaluating and checkpointing the global adapter after each."""
    cfg, strategy = fed.cfg, fed.strategy
    console = console or Console(stderr=True)
    folder = RunFolder(run_dir, cfg)
    started = time.perf_counter()
    metrics = fed.evaluator(strategy.global_adapter)
    folder.record_round(
        _row(0, metrics, fed, round_time_s=0.0, wall_time_s=time.perf_counter() - started)
    )
    console.print(f"round 0: accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}")
    total_up = total_down = 0
    rounds = cfg.federation.rounds
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task(f"{cfg.strategy.name}", total=rounds)
        for server_round in range(1, rounds + 1):
            round_start = time.perf_counter()
            messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
            strategy.aggregate_train(server_round, replies)
            metrics = fed.evaluator(strategy.global_adapter)
            total_up += strategy.stats.bytes_up
            total_down += strategy.stats.bytes_down
            now = time.perf_counter()
            folder.record_round(
                _row(
                    server_round,
                    metrics,
                    fed,
                    round_time_s=now - round_start,
                    wall_time_s=now - started,
                )
            )
            fed.save_adapter(folder.adapter_dir)
            progress.update(bar, advance=1)
            console.print(
                f"round {server_round}: accuracy {metrics['accuracy']:.4f}"
                f"  loss {metrics['loss']:.4f}"
                f"  replies {strategy.stats.replied}/{strategy.stats.sampled}"
                f"  up {strategy.stats.bytes_up / 1e6:.2f} MB"
                f"  down {strategy.stats.bytes_down / 1e6:.2f} MB"
            )
    epsilons = [r["max_epsilon"] for r in folder.rows if r["max_epsilon"] is not None]
    summary = {
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "num_clients": cfg.federation.num_clients,
        "rounds_completed": len(folder.rows) - 1,
        "final_accuracy": folder.rows[-1]["accuracy"],
        "final_loss": folder.rows[-1]["loss"],
        "final_macro_f1": folder.rows[-1]["macro_f1"],
        "accuracy_by_round": [r["accuracy"] for r in folder.rows],
        "bytes_up": total_up,
        "bytes_down": total_down,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "max_epsilon": max(epsilons) if epsilons else None,
        "adapter_dir": str(folder.adapter_dir.resolve()),
        "run_dir": str(folder.path.resolve()),
        "partition_sizes": fed.partition_sizes,
    }
    folder.plot_accuracy(f"{cfg.strategy.name} on {cfg.dataset.name}")
    folder.write_summary(summary)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: the run-config key `overrides` carries Hydra overrides."""
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    cfg = compose_config(overrides)
    fed = prepare(cfg)
    run_federation(grid, fed, default_run_dir(cfg))
