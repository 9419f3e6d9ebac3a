"""Framework overhead per round: a Flower simulation against a plain in-process loop, in one run.

    python benchmarks/overhead.py                                   # quickstart: MiniLM, 3 rounds
    python benchmarks/overhead.py --model tiny_bert --rounds 2      # a quick run

Both runs use the same config (the default quickstart: fedavg, MiniLM, SpamAssassin, 4 clients,
3 rounds, 30 local steps, unless overridden). The baseline is a plain loop in this process doing
the same client work with the library pieces the ClientApp uses: per round and sampled client,
reset the (cached) model runtime with the global adapter, train the same steps on the client's
partition, read the factors; then the strategy's aggregation and the server's evaluation. The
Flower run is `fedpeft simulate` with the same overrides (Ray actors, messages, identity query,
per-round adapter save and checkpoint). Per round it prints the Flower round time (the run's
`round_time_s`), the in-process round time with its train / aggregate / evaluate split, and the
overhead = (Flower - in-process) / Flower; whole runs are timed end to end the same way (the
Flower one including Ray start-up). Target from the issue: <= 15% of the round.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FEDPEFT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared/data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import datasets  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

try:
    from fedpeft import adapters, lowrank, training
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedpeft import adapters, lowrank, training
from fedpeft.cli import simulate  # noqa: E402
from fedpeft.clients.client_data import client_examples  # noqa: E402
from fedpeft.clients.node_config import node_task  # noqa: E402
from fedpeft.config import compose_config  # noqa: E402
from fedpeft.federation import prepare  # noqa: E402
from fedpeft.runtime import adapter_spec, model_runtime  # noqa: E402

TARGET = 0.15


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="model group, e.g. minilm, tiny_bert")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for both runs")
    return parser.parse_args()


def train_client(fed, global_adapter: dict, member: int, server_round: int) -> tuple[dict, int]:
    """One sampled client's local round, as the ClientApp does it without Flower around it."""
    cfg, strategy = fed.cfg, fed.strategy
    wire = json.loads(json.dumps({**strategy.task, **strategy.round_instructions(server_round)}))
    task = node_task(wire, {})
    spec, runtime = adapter_spec(task), model_runtime(task)
    node = {"partition-id": member, "num-partitions": cfg.federation.num_clients}
    examples = client_examples(task, node)
    runtime.reset({k: global_adapter[k] for k in strategy.down_keys(member)})
    hp = training.TrainSettings.parse(task["train"])
    optimizer, steps = training.local_round(runtime.model, hp, len(examples))
    seed = training.sampler_seed(int(task["seed"]), server_round, member)
    result = training.train_steps(
        runtime.model, examples, optimizer, steps=steps, batch_size=hp.batch_size,
        pad_token_id=runtime.tokenizer.pad_token_id, device=runtime.device, seed=seed,
        max_grad_norm=hp.max_grad_norm,
    )  # fmt: skip
    keys = adapters.select_keys(
        adapters.adapter_tensors(runtime.model), spec.trained_factors, spec.train_head
    )
    reply = {k: v.detach().clone() for k, v in adapters.read_adapter(runtime.model, keys).items()}
    return reply, result.num_examples


def in_process(overrides: list[str]) -> tuple[float, list[dict]]:
    """The plain loop: whole-run seconds (prepare included) and per-round timings."""
    started = time.perf_counter()
    fed = prepare(compose_config(overrides))
    fed.evaluator(fed.strategy.global_adapter)  # round 0, as the Flower run does
    strategy, fc = fed.strategy, fed.cfg.federation
    rng = random.Random(fed.cfg.seed)
    size = min(fc.num_clients, max(fc.min_clients, int(fc.fraction * fc.num_clients)))
    rounds = []
    for server_round in range(1, fc.rounds + 1):
        t0 = time.perf_counter()
        replies = [
            train_client(fed, strategy.global_adapter, member, server_round)
            for member in sorted(rng.sample(range(fc.num_clients), size))
        ]
        t1 = time.perf_counter()
        weights = lowrank.normalize_weights([n for _, n in replies])
        strategy.aggregate_updates([u for u, _ in replies], weights)
        t2 = time.perf_counter()
        metrics = fed.evaluator(strategy.global_adapter)
        t3 = time.perf_counter()
        rounds.append(
            {"round": t3 - t0, "train": t1 - t0, "aggregate": t2 - t1, "evaluate": t3 - t2,
             "accuracy": metrics["accuracy"]}
        )  # fmt: skip
    return time.perf_counter() - started, rounds


def flower(overrides: list[str]) -> tuple[float, float, list[dict]]:
    """`fedpeft simulate`: whole-call seconds, the run's own wall time, and its history rows."""
    started = time.perf_counter()
    summary = simulate(overrides)
    elapsed = time.perf_counter() - started
    with open(Path(summary["run_dir"]) / "history.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["round"]) > 0]
    return elapsed, float(summary["wall_time_s"]), rows


def main() -> int:
    args = parse_args()
    datasets.disable_progress_bars()
    console = Console(width=120)
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-overhead-"))
    overrides = [
        f"model={args.model}",
        f"federation.rounds={args.rounds}",
        f"federation.num_clients={args.clients}",
        f"federation.local_steps={args.local_steps}",
        *args.overrides,
    ]
    console.print(f"overrides: {' '.join(overrides)}")
    base_total, base = in_process(overrides)
    console.print(f"in-process loop: {base_total:.1f} s")
    flwr_total, flwr_wall, rows = flower([*overrides, f"run_dir={tmp / 'flower'}"])
    console.print(f"fedpeft simulate: {flwr_total:.1f} s")

    table = Table(title=f"Framework overhead per round ({args.model}, {args.clients} clients)")
    for column in (
        "round", "flower (s)", "in-process (s)", "train", "aggregate", "evaluate", "overhead"
    ):  # fmt: skip
        table.add_column(column, justify="right")
    overheads = []
    for row, ours in zip(rows, base, strict=True):
        theirs = float(row["round_time_s"])
        overhead = (theirs - ours["round"]) / theirs
        overheads.append(overhead)
        table.add_row(
            row["round"], f"{theirs:.2f}", f"{ours['round']:.2f}", f"{ours['train']:.2f}",
            f"{ours['aggregate']:.3f}", f"{ours['evaluate']:.2f}", f"{overhead:.1%}",
        )  # fmt: skip
    rounds_flwr = sum(float(r["round_time_s"]) for r in rows)
    rounds_base = sum(r["round"] for r in base)
    table.add_row(
        "all rounds", f"{rounds_flwr:.2f}", f"{rounds_base:.2f}", "", "", "",
        f"{(rounds_flwr - rounds_base) / rounds_flwr:.1%}",
    )  # fmt: skip
    table.add_row(
        "whole run", f"{flwr_total:.2f}", f"{base_total:.2f}", "", "", "",
        f"{(flwr_total - base_total) / flwr_total:.1%}",
    )  # fmt: skip
    console.print(table)
    console.print(
        f"flower run wall_time_s (rounds + saves + checkpoints, no Ray start-up) {flwr_wall:.2f};"
        f" Ray start-up, identity query and prepare: {flwr_total - flwr_wall:.2f} s"
    )
    later = overheads[1:] or overheads
    verdict = "met" if max(later) <= TARGET else "not met"
    console.print(
        f"overhead after round 1: max {max(later):.1%}; round 1 {overheads[0]:.1%}; "
        f"target <= {TARGET:.0%}: {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
