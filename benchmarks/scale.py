"""Cross-device scale: populations of 100 to 10^6 simulated clients, a fixed cohort per round.

    python benchmarks/scale.py --clients 100,100000,1000000 --sampled 100 --local-steps 1
    python benchmarks/scale.py --clients 100,100000,1000000 --sampled 100 --local-steps 30
    python benchmarks/scale.py --clients 10,50000 --sampled 10 --local-steps 1 --target 1.2
    python benchmarks/scale.py --clients 10,50000 --sampled 10 --pool-size population  # no pool

The issue-31 targets: a population of 10^6 with 100 sampled per round costs at most 1.5x the
driver memory, process-tree memory and median round time of a 100-client run that samples all
100 (the first count of the invocation), at 1-step and 30-step rounds; 50,000 with 10 sampled at
most 1.2x of 10 clients sampling all 10. `--target` prints whether the last count meets it.

Each client count runs `python -m fedpeft.cli simulate` in a fresh subprocess (tiny_bert on SST-2,
federation.fraction = sampled / clients, min_clients = sampled), while this script samples the
process tree every --interval seconds with psutil. Data: by default every count uses sampled
client data sets (partition=sampled, about 20 sentences per client drawn from SST-2's 67,349),
so that only the population changes between counts; `--partition iid` splits SST-2 instead (at
most 67,349 clients). A simulation registers `federation.pool_size` Flower nodes (default: sized
to the cohort, fedpeft/client_pool.py); `--pool-size population` gives every client its own node,
as fedpeft did before pools. Per count it prints:
- pool: the Flower nodes the simulation registered (summary.json's pool_size);
- driver: the peak resident memory of the driver process (server, strategy, evaluator, and
  Flower's in-process SuperLink with its per-node records);
- tree: the peak of the summed resident memory of the whole process tree (driver, Ray's services,
  the actors that run the ClientApp);
- to round 1: seconds from launch to the end of round 1, split into prepare (imports, data,
  partitions, model: launch to fedpeft's banner), start (Ray, Flower registering the nodes, the
  round-0 evaluation: banner to round 0), round 1 (its round_time_s) and the rest;
- median round: the median round_time_s of the rounds after the first (history.csv);
- driver CPU s: the driver's CPU seconds (user + system) over the whole run: Flower's simulation
  engine polls every registered node every 0.1 s from the driver;
and each as a ratio to the first (smallest) count of the same invocation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
#: (phase name, the line fedpeft prints on stderr when it ends)
MARKS = (("prepared", "fedpeft "), ("round 0", "round 0:"), ("round 1", "round 1:"))


@dataclass
class Measure:
    """What one run's process tree used, and when fedpeft's progress lines came."""

    driver: float = 0.0
    tree: float = 0.0
    driver_cpu: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    code: int = 0
    round_times: list[float] = field(default_factory=list)
    pool: int | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients",
        default="10,1000,10000,50000",
        help="comma-separated client counts; ratios are against the first",
    )
    parser.add_argument("--sampled", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--model", default="tiny_bert", help="model group, e.g. tiny_bert, minilm")
    parser.add_argument(
        "--partition", default="sampled", help="partition group (sampled, iid, dirichlet, ...)"
    )
    parser.add_argument(
        "--pool-size",
        default="auto",
        help="federation.pool_size: auto (sized to the cohort), population (a node per client), "
        "or a number",
    )
    parser.add_argument(
        "--target", type=float, default=None, help="ratio the last count must stay within"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the median is over 2..)")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides for every run")
    return parser.parse_args()


def rss(proc: psutil.Process) -> float:
    """Resident memory of one process in MiB (0 when it is gone)."""
    try:
        return proc.memory_info().rss / MB
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


def sample(driver: psutil.Process, measure: Measure) -> None:
    """Fold one snapshot of the driver's process tree into `measure`."""
    own = rss(driver)
    measure.driver = max(measure.driver, own)
    try:
        times = driver.cpu_times()
        measure.driver_cpu = max(measure.driver_cpu, times.user + times.system)
        children = driver.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    measure.tree = max(measure.tree, own + sum(rss(c) for c in children))


def watch(stream, log, started: float, measure: Measure) -> None:  # noqa: ANN001
    """Copy the run's output to its log, noting when each progress line first appears."""
    for line in stream:
        log.write(line)
        for name, prefix in MARKS:
            if name not in measure.marks and line.lstrip().startswith(prefix):
                measure.marks[name] = time.perf_counter() - started


def run(clients: int, args: argparse.Namespace, run_dir: Path) -> Measure:
    """One simulation in a fresh subprocess, measured."""
    overrides = [
        f"model={args.model}",
        "dataset=sst2",
        f"partition={args.partition}",
        "train.max_length=32",
        "dataset.max_test_examples=200",
        f"federation.num_clients={clients}",
        f"federation.fraction={args.sampled / clients}",
        f"federation.min_clients={args.sampled}",
        f"federation.rounds={args.rounds}",
        f"federation.local_steps={args.local_steps}",
        *pool_override(args.pool_size, clients),
        f"run_dir={run_dir}",
        *args.overrides,
    ]
    env = {
        "FEDPEFT_DATA_DIR": str(REPO.parent / "shared" / "data"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",  # progress lines arrive when printed, for the phase times
        **os.environ,
    }
    command = [sys.executable, "-m", "fedpeft.cli", "simulate", *overrides]
    measure = Measure()
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        reader = threading.Thread(target=watch, args=(proc.stdout, log, started, measure))
        reader.start()
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            sample(driver, measure)
            time.sleep(args.interval)
        reader.join()
    measure.wall = time.perf_counter() - started
    measure.code = proc.returncode
    history = run_dir / "history.csv"
    if history.exists():
        rows = list(csv.DictReader(history.open()))
        measure.round_times = [float(r["round_time_s"]) for r in rows[1:]]
    summary = run_dir / "summary.json"
    if summary.exists():
        measure.pool = json.loads(summary.read_text()).get("pool_size")
    return measure


def pool_override(setting: str, clients: int) -> list[str]:
    """The federation.pool_size override for --pool-size (none for auto)."""
    if setting == "auto":
        return []
    return [f"federation.pool_size={clients if setting == 'population' else int(setting)}"]


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


def main() -> int:
    args = parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    console = Console(width=160)
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-scale-"))
    console.print(
        f"{args.model} on SST-2 ({args.partition}), {args.sampled} clients sampled per round, "
        f"{args.rounds} rounds of {args.local_steps} local steps; {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; logs in {tmp}"
    )
    results = []
    for clients in counts:
        m = run(clients, args, tmp / f"clients-{clients}")
        status = "ok" if m.code == 0 else f"exit {m.code} (see {tmp}/clients-{clients}.log)"
        console.print(f"  {clients} clients: {m.wall:.1f} s, {status}")
        results.append((clients, m, status))
    table = Table(title=f"{args.model}, {args.sampled} sampled per round: memory (MiB), time (s)")
    for column in (
        "clients", "pool", "driver", "tree", "to round 1", "prepare", "start", "round 1",
        "median round",
        "driver CPU s", "driver x", "tree x", "to round 1 x", "median round x", "status",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    base = None
    for clients, m, status in results:
        marks = m.marks
        end = marks.get("round 1")
        median = statistics.median(m.round_times[1:]) if len(m.round_times) > 1 else None
        row = {"driver": m.driver, "tree": m.tree, "end": end, "median": median}
        base = base or row
        prepared, started = marks.get("prepared"), marks.get("round 0")
        table.add_row(
            str(clients), str(m.pool or "-"), f"{m.driver:.0f}", f"{m.tree:.0f}", seconds(end),
            seconds(prepared),
            seconds(started - prepared if started and prepared else None),
            seconds(m.round_times[0] if m.round_times else None), seconds(median),
            f"{m.driver_cpu:.0f}", ratio(m.driver, base["driver"]), ratio(m.tree, base["tree"]),
            ratio(end, base["end"]), ratio(median, base["median"]), status,
        )  # fmt: skip
    console.print(table)
    console.print(f"ratios (x) are against the {counts[0]}-client run of this invocation")
    if args.target is not None and base is not None and len(results) > 1:
        clients, m, _ = results[-1]
        median = statistics.median(m.round_times[1:]) if len(m.round_times) > 1 else None
        for name, value, against in (
            ("driver memory", m.driver, base["driver"]),
            ("tree memory", m.tree, base["tree"]),
            ("median round", median, base["median"]),
        ):
            met = value is not None and against and value / against <= args.target
            console.print(
                f"target {args.target}x, {name} at {clients} clients: {ratio(value, against)}x "
                + ("met" if met else "NOT met")
            )
    return 0 if all(r[2] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
