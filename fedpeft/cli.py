"""fedpeft's commands: `simulate` one federation, `compare` a grid, `audit` a run's privacy, ..."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from fedpeft import certs
from fedpeft.errors import FedPeftError, RunFailed
from fedpeft.node import command as node_command


def _quiet(verbose: bool) -> None:
    """Keep Flower's, Ray's and transformers' own logs out of the way unless verbose=true."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore")
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        for name in ("flwr", "ray", "transformers", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)


def simulate(overrides: Sequence[str], on_prepared: Callable[[Any], None] | None = None) -> dict:
    """Compose the config, prepare data and model, and run all rounds in Flower's simulation.

    `on_prepared` sees the prepared Federation before round 1 (the audit adds its canaries).
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from rich.console import Console
    from rich.table import Table

    from fedpeft.client_pool import PoolGrid
    from fedpeft.client_resources import (
        attaches_to_cluster,
        check_client_resources,
        check_ray_address,
    )
    from fedpeft.clients.client_store import ClientStore
    from fedpeft.clients.simulation import CLIENT_STORE, simulation_app
    from fedpeft.config import compose_config
    from fedpeft.federation import prepare
    from fedpeft.privacy.policy import NodePolicy
    from fedpeft.server_app import default_run_dir, resume_point, run_federation

    cfg = compose_config(list(overrides))
    _quiet(cfg.verbose)
    check_ray_address()
    if not attaches_to_cluster():
        check_client_resources(cfg.federation.client_cpus, cfg.federation.client_gpus)
    console = Console(stderr=True)
    run_dir = default_run_dir(cfg)
    resumed = resume_point(cfg, run_dir)
    fed = prepare(cfg)
    if on_prepared is not None:
        on_prepared(fed)
    console.print(
        f"[bold]fedpeft[/bold] {cfg.strategy.name} on {cfg.dataset.name} with {cfg.model.name}: "
        f"{cfg.federation.num_clients} clients ({_sizes(fed)}), {cfg.federation.rounds} rounds"
        + (f", served by a pool of {fed.pool_size} nodes" if fed.pooled else "")
    )
    result: dict = {}

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # noqa: ANN001
        if fed.pooled:  # the server addresses clients; a pool of nodes serves them
            grid = PoolGrid(grid, population=cfg.federation.num_clients, pool=fed.pool_size)
        result.update(run_federation(grid, fed, run_dir, console, identify=True, resumed=resumed))

    fed_cfg = cfg.federation
    backend = {
        "client_resources": {"num_cpus": fed_cfg.client_cpus, "num_gpus": fed_cfg.client_gpus},
        "init_args": {
            "logging_level": logging.INFO if cfg.verbose else logging.ERROR,
            "log_to_driver": bool(cfg.verbose),
            "configure_logging": True,
        },
    }
    policy = NodePolicy.for_simulation(cfg.dp, run_dir / "node_state")
    # pooled clients' state lasts one start, like one node's Context.state (client_store.py)
    ClientStore(policy.state_dir / CLIENT_STORE).clear()
    run_simulation(
        server_app=server_app,
        client_app=simulation_app(policy),
        num_supernodes=fed.pool_size,
        backend_config=backend,
        verbose_logging=bool(cfg.verbose),
    )
    if not result:
        raise FedPeftError(
            "the simulation stopped before the server finished its rounds; Flower's log above "
            "says why (rerun with verbose=true for Ray's own log)"
        )
    personal = result.get("evaluation") == "personalised"
    table = Table(
        title="personalised accuracy (mean over clients)" if personal else "held-out accuracy"
    )
    table.add_column("round", justify="right")
    table.add_column("accuracy", justify="right")
    for server_round, accuracy in enumerate(result["accuracy_by_round"]):
        if accuracy is not None:
            table.add_row(str(server_round), f"{accuracy:.4f}")
    out = Console()
    out.print(table)
    final = result["final_accuracy"]
    out.print(
        ("final accuracy not released" if final is None else f"final accuracy {final:.4f}")
        + (" (personalised)" if personal else "")
        + f" after {result['rounds_completed']} rounds "
        f"in {result['wall_time_s']:.1f} s; {result['bytes_up'] / 1e6:.2f} MB up, "
        f"{result['bytes_down'] / 1e6:.2f} MB down; run folder {result['run_dir']}"
    )
    _fail_without_replies(result)
    return result


def _sizes(fed: Any) -> str:
    """The partitions' sizes for the banner: each one for a few clients, else a summary."""
    if len(fed.partition_sizes) <= 20:
        return f"sizes {fed.partition_sizes}"
    brief = fed.size_summary()
    return f"sizes {brief['min']} to {brief['max']}, median {brief['median']}"


def _fail_without_replies(result: dict) -> None:
    """A run in which no round had a single valid reply trained nothing: that is a failure."""
    rounds = result["rounds_completed"]
    if rounds == 0 or result["rounds_with_replies"] > 0:
        return
    raise RunFailed(
        f"every reply failed in all {rounds} rounds ({result['failed_replies']} failed, "
        f"{result['rejected_replies']} rejected), so nothing was trained; the first reason: "
        f"{result['first_failure']}; every reason is in {result['run_dir']}/history.csv"
    )


def audit(args: Sequence[str]) -> dict:
    """`fedpeft audit`: a federation with canaries, and its empirical lower bound on epsilon."""
    from rich.console import Console
    from rich.table import Table

    from fedpeft.audit import audit as run_audit
    from fedpeft.audit import verdict

    record = run_audit(args, simulate)
    table = Table(title="one-run privacy audit (docs/privacy.md)")
    for column in ("accounted epsilon", "audited lower bound", "delta", "confidence", "canaries"):
        table.add_column(column, justify="right")
    accounted = record["accounted_epsilon"]
    table.add_row(
        "not private" if accounted is None else f"{accounted:.3f}",
        f"{record['audited_epsilon_lower_bound']:.3f}",
        f"{record['delta']:.1e}",
        f"{record['confidence']:.0%}",
        f"{record['canaries']} {record['canary_kind']} "
        f"({record['correct']}/{record['guesses']} guesses right)",
    )
    Console().print(table)
    client = record.get("client_level")
    if client is not None:
        Console().print(
            f"client level ({client['canary_clients']} canary clients, Andrew et al.): epsilon "
            f"estimate {client['epsilon_estimate']:.2f} at delta {client['delta']:.1e} (two-"
            f"Gaussian fit {client['epsilon_two_gaussians']:.2f}); an estimate, not a bound: "
            "fedpeft accounts example-level DP only"
        )
    reason = verdict(record)
    if reason is not None:
        raise RunFailed(reason)
    return record


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def compare(args: Sequence[str]) -> int:
    """Run a grid of federations (fedpeft.compare), show its table; 1 when a run failed."""
    from rich.console import Console
    from rich.markdown import Markdown

    from fedpeft.compare import compare as run_compare

    # SIGTERM ends the grid like Ctrl-C: running trials (their own process groups) are stopped
    # and no further run starts; a rerun resumes
    signal.signal(signal.SIGTERM, _interrupt)
    result = run_compare(args)
    out = Console()
    out.print(Markdown(result.table.read_text()))
    written = [result.results_csv, result.table, *result.csvs, *result.plots]
    out.print("results: " + ", ".join(map(str, written)))
    if result.failed:
        print(f"fedpeft: {len(result.failed)} runs failed (see the table)", file=sys.stderr)
        return 1
    return 0


def evaluate(run_dir: str, args: Sequence[str]) -> dict:
    """Run lm-evaluation-harness on a causal run's adapter; its JSON goes into the run folder."""
    from rich.console import Console
    from rich.table import Table

    from fedpeft.harness import evaluate_run

    _quiet(False)
    result = evaluate_run(run_dir, args)
    table = Table(title=f"lm-eval on {run_dir}")
    for column in ("task", "metric", "value", "n-shot"):
        table.add_column(column)
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float | int) and "stderr" not in key and key != "sample_len":
                table.add_row(task, key, f"{value:.4f}", str(result["n-shot"].get(task, "")))
    out = Console()
    out.print(table)
    out.print(f"lm-eval results: {result['results_path']}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; bad input prints one line on stderr and exits 2."""
    # bitsandbytes (imported with peft) logs a missing optional CPU kernel, and the torch module
    # it imports warns about torch.jit once (Flower shows every DeprecationWarning once): noise on
    # every command, from code fedpeft never uses
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if importlib.util.find_spec("bitsandbytes") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch.utils.mkldnn  # noqa: F401
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated fine-tuning with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a simulated federation")
    sim.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=ffa_lora")
    cmp = sub.add_parser("compare", help="run a grid of federations; leave a table and plots")
    cmp.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, comma lists sweep (strategy=fedavg,fedsvd seed=0,1), plus "
        "out_dir=, jobs=, target=, study=<name>, audit=<canaries>, baseline=<strategy> and "
        "tune=<trials per method>",
    )
    aud = sub.add_parser("audit", help="a federation with canaries: an empirical epsilon bound")
    aud.add_argument(
        "overrides",
        nargs="*",
        help="the run's Hydra overrides (e.g. dp=eps3) plus canaries=1000, canary_seed=0, "
        "confidence=0.95; exit 1 when the bound exceeds the ledger's epsilon",
    )
    ev = sub.add_parser("evaluate", help="lm-evaluation-harness on a causal run's adapter")
    ev.add_argument("run_dir", help="a causal-LM run folder (config.yaml, adapter/)")
    ev.add_argument(
        "options",
        nargs="*",
        help="tasks=gsm8k[,gsm8k_fedpeft,...] plus limit=, batch_size=, num_fewshot=, "
        "max_new_tokens=, data_dir=, chat=, device=",
    )
    certs.add_subcommand(sub)
    node_command.add_subcommand(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            simulate(args.overrides)
        elif args.command == "audit":
            audit(args.overrides)
        elif args.command == "compare":
            return compare(args.overrides)
        elif args.command == "evaluate":
            evaluate(args.run_dir, args.options)
        elif args.command == "certs":
            certs.run_subcommand(args)
        elif args.command == "node":
            return node_command.run(args)
    except RunFailed as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 1
    except FedPeftError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command != "compare":
            raise
        print("fedpeft: compare interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
