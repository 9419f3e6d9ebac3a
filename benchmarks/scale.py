"""Peak memory of a simulated federation with 10, 100 and 1000 clients, 10 sampled per round.

    python benchmarks/scale.py                              # tiny_bert on SST-2, 2 rounds
    python benchmarks/scale.py --model minilm --clients 10 100 1000 --rounds 3

Each client count runs `python -m fedpeft.cli simulate` in a fresh subprocess (IID SST-2,
federation.fraction = sampled / clients, min_clients = sampled, a few local steps), while this
script samples the process tree every --interval seconds with psutil: the driver's resident memory
(server, strategy, evaluator and the in-process SuperLink state of every simulated node), each Ray
worker's (the actors that run the ClientApp), and Ray's own services (GCS, raylet, ...). It prints
the peaks and the wall time per count, with ratios against the smallest count measured in the same
run: memory that does not grow with the number of clients means no per-client model copies.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


@dataclass
class Peaks:
    """Peak resident memory (MiB) seen in one run's process tree."""

    driver: float = 0.0
    worker_max: float = 0.0
    worker_sum: float = 0.0
    services: float = 0.0
    workers_seen: set[int] = field(default_factory=set)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--model", default="tiny_bert", help="model group, e.g. tiny_bert, minilm")
    parser.add_argument("--rounds", type=int, default=2)
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


def is_worker(proc: psutil.Process) -> bool:
    """A Ray worker process (its title starts `ray::`, e.g. ray::ClientAppActor)."""
    try:
        return proc.name().startswith("ray::") or " ray::" in " ".join(proc.cmdline()[:1])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def sample(driver: psutil.Process, peaks: Peaks) -> None:
    """Fold one snapshot of the driver's process tree into `peaks`."""
    peaks.driver = max(peaks.driver, rss(driver))
    try:
        children = driver.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    workers = [c for c in children if is_worker(c)]
    sizes = [rss(w) for w in workers]
    peaks.workers_seen.update(w.pid for w in workers)
    peaks.worker_max = max([peaks.worker_max, *sizes])
    peaks.worker_sum = max(peaks.worker_sum, sum(sizes))
    peaks.services = max(peaks.services, sum(rss(c) for c in children if c not in workers))


def run(clients: int, args: argparse.Namespace, run_dir: Path) -> tuple[Peaks, float, int]:
    """One simulation in a fresh subprocess: its peaks, wall seconds and exit status."""
    overrides = [
        f"model={args.model}",
        "dataset=sst2",
        "partition=iid",
        "train.max_length=32",
        "dataset.max_test_examples=200",
        f"federation.num_clients={clients}",
        f"federation.fraction={args.sampled / clients}",
        f"federation.min_clients={args.sampled}",
        f"federation.rounds={args.rounds}",
        f"federation.local_steps={args.local_steps}",
        f"run_dir={run_dir}",
        *args.overrides,
    ]
    env = {
        "FEDPEFT_DATA_DIR": str(REPO.parent / "shared" / "data"),
        "HF_HUB_OFFLINE": "1",
        **os.environ,
    }
    command = [sys.executable, "-m", "fedpeft.cli", "simulate", *overrides]
    peaks = Peaks()
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            sample(driver, peaks)
            time.sleep(args.interval)
    return peaks, time.perf_counter() - started, proc.returncode


def main() -> int:
    args = parse_args()
    console = Console(width=120)
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-scale-"))
    console.print(
        f"{args.model} on SST-2 (IID), {args.sampled} clients sampled per round, {args.rounds} "
        f"rounds of {args.local_steps} local steps; {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; logs in {tmp}"
    )
    results = []
    for clients in args.clients:
        peaks, wall, code = run(clients, args, tmp / f"clients-{clients}")
        status = "ok" if code == 0 else f"exit {code} (see {tmp}/clients-{clients}.log)"
        console.print(f"  {clients} clients: {wall:.1f} s, {status}")
        results.append((clients, peaks, wall, status))
    base_peaks, base_wall = results[0][1], results[0][2]
    table = Table(title=f"Peak resident memory (MiB) against clients ({args.model})")
    for column in (
        "clients", "driver", "worker max", "workers sum", "ray services", "workers",
        "wall (s)", "driver x", "worker max x", "wall x", "status",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for clients, peaks, wall, status in results:
        table.add_row(
            str(clients), f"{peaks.driver:.0f}", f"{peaks.worker_max:.0f}",
            f"{peaks.worker_sum:.0f}", f"{peaks.services:.0f}", str(len(peaks.workers_seen)),
            f"{wall:.1f}", f"{peaks.driver / base_peaks.driver:.2f}",
            f"{peaks.worker_max / max(base_peaks.worker_max, 1e-9):.2f}",
            f"{wall / base_wall:.2f}", status,
        )  # fmt: skip
    console.print(table)
    console.print(f"ratios (x) are against the {results[0][0]}-client run of this invocation")
    return 0 if all(r[3] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
