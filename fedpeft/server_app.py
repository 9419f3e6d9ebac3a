"""The Flower ServerApp: runs the rounds, evaluates, checkpoints, and writes the run folder."""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedpeft import checkpoint, identity
from fedpeft.client_pool import PoolGrid
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import Federation, prepare
from fedpeft.run_folder import RunFolder
from fedpeft.secure_sum import SecureSum
from fedpeft.stop_rule import StopAt
from fedpeft.strategies.base import LowRankStrategy
from fedpeft.strategies.round_stats import RoundStats
from fedpeft.tracking import Tracking

#: Longest failure reason kept in history.csv (the log has it whole).
REASON_CHARS = 300
#: summary.json lists every partition's size up to this many clients (beyond: the summary only)
MAX_LISTED_SIZES = 10_000

app = ServerApp()


def default_run_dir(cfg: DictConfig) -> Path:
    """runs/<date>-<time>-<strategy> under the working directory, unless run_dir= is given.

    A resumed run continues in the folder it resumes (resume=<run_dir>).
    """
    if cfg.get("resume"):
        if cfg.run_dir and Path(cfg.run_dir).resolve() != Path(cfg.resume).resolve():
            raise ConfigError(
                f"run_dir={cfg.run_dir} differs from resume={cfg.resume}: a resumed run "
                "continues in its own folder; drop run_dir="
            )
        return Path(cfg.resume)
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
        "update_norm": stats.update_norm,
        "dp_noise_norm": stats.dp_noise_norm,
        "sampled": stats.sampled,
        "replied": stats.replied,
        "failed": len(stats.failed),
        "rejected": len(stats.rejected),
        "max_epsilon": max(eps.values()) if eps else None,
        "client_level_epsilon": stats.client_dp.epsilon if stats.client_dp else None,
        "clip_norm": stats.client_dp.clip_norm if stats.client_dp else None,
        "client_seconds": (
            round(stats.client_seconds, 6) if stats.client_seconds is not None else None
        ),
        "client_train_loss": {str(k): round(v, 5) for k, v in stats.client_loss.items()},
        "client_epsilon": {str(k): v for k, v in eps.items()},
        "failures": {
            str(k): reason[:REASON_CHARS]
            for k, reason in sorted({**stats.failed, **stats.rejected}.items())
        },
        **extra,
    }


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> None:
    """Wait up to `timeout` seconds for `expected` nodes to connect."""
    deadline = time.monotonic() + timeout
    while len(grid.get_node_ids()) < expected and time.monotonic() < deadline:
        time.sleep(0.2)


def evaluate_round(grid: Grid, fed: Federation, server_round: int) -> dict[str, Any]:
    """The round's scores: the global adapter on the server's split, or the clients' own.

    A method without a global model (`evaluation == "personalised"`) asks the clients to score
    their personal models (its configure_evaluate); accuracy and loss are None when none
    answered or none was asked (a private run: clients release no such metrics).
    """
    strategy = fed.strategy
    if strategy.evaluation != "personalised":
        return fed.evaluator(strategy.global_adapter)
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
    if not messages:
        return {"accuracy": None, "loss": None}
    replies = grid.send_and_receive(messages, timeout=fed.cfg.federation.round_timeout)
    record = strategy.aggregate_evaluate(server_round, replies)
    return {"accuracy": None, "loss": None, **(dict(record) if record is not None else {})}


def _scores(metrics: Mapping[str, Any]) -> str:
    """Accuracy and loss for the console ("not released" when a personalised run has none)."""
    if metrics.get("accuracy") is None:
        return "accuracy not released"
    return f"accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}"


def resume_point(cfg: DictConfig, run_dir: Path) -> checkpoint.Checkpoint | None:
    """The checkpoint a `resume=` run continues from, checked against `cfg`; None otherwise."""
    if not cfg.get("resume"):
        return None
    resumed = checkpoint.load(run_dir)
    checkpoint.check_resumable(resumed, cfg)
    return resumed


def run_federation(
    grid: Grid,
    fed: Federation,
    run_dir: Path,
    console: Console | None = None,
    *,
    identify: bool = False,
    expected_nodes: int | None = None,
    resumed: checkpoint.Checkpoint | None = None,
) -> dict:
    """Run every round on `grid`, evaluating and checkpointing the server's state after each.

    `identify` waits up to the strategy's wait_timeout for `expected_nodes` (default
    federation.num_clients) to connect, then asks each node, before its first round, for its
    stable name and example count (fedpeft/identity.py), so that sampling and records do not
    depend on Flower's node ids and replies cannot claim more than their node declared: in a
    simulation when the node is first sampled, in a deployment when it joins.
    With `resume=<run_dir>` in the config the run continues from that folder's checkpoint
    (`resumed`, when the caller has loaded it already). A `federation.stop_at.*` rule that is
    met makes its round the last (evaluated, saved and checkpointed like any last round).
    With `secagg.enabled` each round's train messages go through SecAgg+ (secure_sum.py) and the
    strategy releases the noised secure sum instead of screening replies.
    """
    cfg, strategy = fed.cfg, fed.strategy
    console = console or Console(stderr=True)
    if resumed is None:
        resumed = resume_point(cfg, run_dir)
    folder = RunFolder(run_dir, cfg)
    tracking = Tracking.open(cfg, folder.path, resumed.server_round + 1 if resumed else 0)
    stop_at = StopAt.from_config(cfg)
    secure = SecureSum.from_config(cfg, strategy)
    stopped = None
    asked: set[int] = set()
    if identify:
        wait_for_nodes(grid, expected_nodes or cfg.federation.num_clients, strategy.wait_timeout)
    # A simulation identifies a node when it is first sampled (its cost follows the sampled
    # clients, not all of them); a deployment identifies every node when it joins. A pooled
    # simulation's nodes are its clients by construction (client_pool.py): the server knows each
    # one's name and, from its own partitioning, its example count.
    pooled = isinstance(grid, PoolGrid)
    simulated = identify and (pooled or bool(identity.registration_names(grid)))
    if simulated:
        strategy.identify_sampled_timeout = strategy.wait_timeout
    if pooled:
        strategy.roster.population = grid.population
        if fed.task.get("canaries") is None:  # an audit's canaries change the counts: ask
            sizes = fed.partition_sizes
            strategy.roster.count = lambda client: int(sizes[client])
    if resumed is not None:
        strategy.load_state_dict(resumed.tensors, resumed.strategy)
        folder.restore(resumed.rows)
        started = time.perf_counter() - resumed.totals["wall_time_s"]
        total_up, total_down = int(resumed.totals["bytes_up"]), int(resumed.totals["bytes_down"])
        console.print(f"resuming {run_dir} after round {resumed.server_round}")
    else:
        started = time.perf_counter()
        metrics = evaluate_round(grid, fed, 0)
        row = _row(0, metrics, fed, round_time_s=0.0, wall_time_s=time.perf_counter() - started)
        folder.record_round(row)
        tracking.log_round(row)
        console.print(f"round 0: {_scores(metrics)}")
        total_up = total_down = 0
    first = resumed.server_round + 1 if resumed is not None else 1
    rounds = cfg.federation.rounds
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task(f"{cfg.strategy.name}", total=rounds, completed=first - 1)
        for server_round in range(first, rounds + 1):
            round_start = time.perf_counter()
            if identify and not simulated:
                strategy.roster.identify_new(grid, asked, strategy.task, strategy.wait_timeout)
            messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
            if secure is not None:  # SecAgg+: the server sees only the sum (secure_sum.py)
                secure.run_round(grid, server_round, messages)
            else:
                replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
                strategy.aggregate_train(server_round, replies)
            total_up += strategy.stats.bytes_up
            total_down += strategy.stats.bytes_down
            budgets = {
                "total_bytes": total_up + total_down,
                "max_epsilon": max_epsilon_so_far(folder.rows, strategy.stats),
            }
            last = server_round == rounds
            # a budget met: this round is the last, so its adapter is evaluated whatever eval.every
            budget_met = not last and stop_at.check(server_round, accuracy=None, **budgets)
            evaluated = bool(budget_met) or server_round % cfg.eval.every == 0 or last
            metrics = evaluate_round(grid, fed, server_round) if evaluated else {}
            accuracy = metrics.get("accuracy")
            stopped = None if last else stop_at.check(server_round, accuracy=accuracy, **budgets)
            now = time.perf_counter()
            row = _row(
                server_round,
                metrics,
                fed,
                round_time_s=now - round_start,
                wall_time_s=now - started,
            )
            folder.record_round(row)
            tracking.log_round(row)
            fed.save_adapter(folder.adapter_dir)
            tensors, state = strategy.state_dict()
            totals = {"bytes_up": total_up, "bytes_down": total_down, "wall_time_s": now - started}
            checkpoint.save(
                folder.path,
                checkpoint.Checkpoint(
                    server_round, tensors, state, folder.rows, totals, checkpoint.plain_config(cfg)
                ),
            )
            progress.update(bar, advance=1)
            stats = strategy.stats
            console.print(
                f"round {server_round}: "
                + (_scores(metrics) if evaluated else "not evaluated")
                + f"  replies {stats.replied}/{stats.sampled}"
                + (f" ({len(stats.failed)} failed)" if stats.failed else "")
                + (f" ({len(stats.rejected)} rejected)" if stats.rejected else "")
                + f"  up {stats.bytes_up / 1e6:.2f} MB"
                f"  down {stats.bytes_down / 1e6:.2f} MB"
            )
            if stopped is not None:
                console.print(
                    f"stopping after round {server_round}: federation.stop_at.{stopped.rule}="
                    f"{stopped.threshold:g} reached ({stopped.rule} {stopped.value:g})"
                )
                break
    epsilons = [r["max_epsilon"] for r in folder.rows if r["max_epsilon"] is not None]
    summary = {
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "num_clients": cfg.federation.num_clients,
        "rounds_completed": len(folder.rows) - 1,
        "final_accuracy": folder.rows[-1]["accuracy"],
        "final_loss": folder.rows[-1]["loss"],
        "final_macro_f1": folder.rows[-1].get("macro_f1"),
        "final_perplexity": folder.rows[-1].get("perplexity"),
        "accuracy_by_round": [r.get("accuracy") for r in folder.rows],
        "bytes_up": total_up,
        "bytes_down": total_down,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "max_epsilon": max(epsilons) if epsilons else None,
        **client_level_summary(strategy),
        "client_seconds": total_client_seconds(folder.rows),
        "stopped_early": stopped.to_dict() if stopped is not None else None,
        "adapter_dir": str(folder.adapter_dir.resolve()),
        "run_dir": str(folder.path.resolve()),
        "partition_sizes": (
            list(fed.partition_sizes) if len(fed.partition_sizes) <= MAX_LISTED_SIZES else None
        ),
        "partition_size_summary": fed.size_summary(),
        "pool_size": fed.pool_size,
        "declared_examples": strategy.roster.declared_by_member(),
        "resumed_from_round": resumed.server_round if resumed is not None else None,
        "evaluation": strategy.evaluation,
        **personalised_summary(strategy, folder.rows),
        "failed_replies": sum(r["failed"] for r in folder.rows),
        "rejected_replies": sum(r["rejected"] for r in folder.rows),
        "rounds_with_replies": sum(1 for r in folder.rows[1:] if r["replied"] > 0),
        "first_failure": next(
            (reason for r in folder.rows[1:] for reason in r["failures"].values()), None
        ),
    }
    folder.plot_accuracy(f"{cfg.strategy.name} on {cfg.dataset.name}")
    folder.write_summary(summary)
    tracking.finish(summary)
    return summary


def max_epsilon_so_far(rows: Sequence[Mapping], current: RoundStats) -> float | None:
    """The largest epsilon so far, example-level (any client's) or client-level (None: none).

    The history's rows hold the rounds before; `current` is the round just aggregated.
    """
    columns = ("max_epsilon", "client_level_epsilon")
    epsilons = [r[c] for r in rows for c in columns if r.get(c) is not None]
    now = [*current.client_epsilon.values()]
    if current.client_dp is not None:
        now.append(current.client_dp.epsilon)
    return max([*epsilons, *now], default=None)


def client_level_summary(strategy: LowRankStrategy) -> dict[str, Any]:
    """summary.json's client-level DP fields: (epsilon, delta) spent, z, rounds, final bound."""
    mechanism = strategy.client_dp
    if mechanism is None:
        return {"client_level_epsilon": None}
    noise = mechanism.noise
    return {
        "client_level_epsilon": mechanism.epsilon(),
        "client_level_delta": noise.delta,
        "client_level_noise_multiplier": noise.noise_multiplier,
        "client_level_sample_rate": noise.sample_rate,
        "client_level_rounds": mechanism.rounds,
        "client_level_clip_norm": mechanism.clip_norm,
        "client_level_clipping": mechanism.settings.clipping,
    }


def total_client_seconds(rows: Sequence[Mapping]) -> float | None:
    """The clients' training CPU seconds over all rounds (None when no reply reported any)."""
    seconds = [r["client_seconds"] for r in rows if r.get("client_seconds") is not None]
    return round(sum(seconds), 6) if seconds else None


def personalised_summary(strategy: LowRankStrategy, rows: Sequence[Mapping]) -> dict[str, Any]:
    """Extra summary fields of a personalised method: final weighted mean, minimum, and why none.

    final_accuracy is then the unweighted mean of the clients' accuracies on their own held-out
    slices, not a global model's held-out accuracy; it is null in a private run.
    """
    if strategy.evaluation != "personalised":
        return {}
    last = rows[-1] if rows else {}
    private = bool((strategy.task.get("dp") or {}).get("enabled")) or strategy.client_dp is not None
    return {
        "final_accuracy_weighted": last.get("accuracy_weighted"),
        "final_accuracy_min": last.get("accuracy_min"),
        "evaluation_note": (
            "personalised metrics are not released under DP (clients refuse: unaccounted)"
            if private
            else "final_accuracy: unweighted mean over clients of each personal model's "
            "accuracy on the client's own held-out slice; not comparable with a global model's"
        ),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: the run-config key `overrides` carries Hydra overrides."""
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    cfg = compose_config(overrides)
    if cfg.faults.crash_prob or cfg.faults.slow_prob:
        log(WARNING, "faults.* apply to simulations only; deployed clients ignore them")
    fed = prepare(cfg, deployed=True)
    # Rounds wait for min_clients nodes; any node connecting later is identified before the
    # round it first takes part in.
    run_federation(
        grid,
        fed,
        default_run_dir(cfg),
        identify=True,
        expected_nodes=cfg.federation.min_clients,
    )
