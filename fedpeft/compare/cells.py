"""Run the grid's runs, each `fedpeft simulate` in its own process; skip the ones already done.

A subprocess per run gives every Flower/Ray simulation a clean process and keeps one crashing run
from ending the grid. A run is done when its folder holds summary.json (written last, atomically),
so a rerun after an interruption or a failure redoes exactly the unfinished runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpeft.compare.grid import Run

LOG_NAME = "simulate.log"
#: the summary key `fedpeft audit` adds (fedpeft/audit.py)
AUDITED = "audited_epsilon_lower_bound"


@dataclass
class Outcome:
    """What became of one run: done before (skipped), ok, or failed with its exit status."""

    run: Run
    status: str
    seconds: float = 0.0
    returncode: int | None = None


def is_done(folder: Path, audit: int = 0) -> bool:
    """A run is done when its summary.json exists (with its audit's bound when audited)."""
    path = folder / "summary.json"
    if not path.is_file():
        return False
    return not audit or AUDITED in json.loads(path.read_text())


def simulate_command(run: Run, folder: Path, audit: int = 0) -> list[str]:
    """The command line that runs one grid point (the folder quoted for Hydra's parser).

    With `audit` > 0 the point runs as `fedpeft audit` with that many canaries (docs/privacy.md).
    """
    command = "audit" if audit else "simulate"
    extra = [f"canaries={audit}"] if audit else []
    return [
        sys.executable, "-m", "fedpeft.cli", command, *run.overrides, f"run_dir='{folder}'", *extra
    ]  # fmt: skip


def run_one(run: Run, out_dir: Path, audit: int = 0) -> Outcome:
    """Run one grid point in a subprocess, its output in <run folder>/simulate.log.

    An audited run whose bound exceeds its ledger exits 1 but finished: it counts as done, and
    the table shows the bound beside the ledger's epsilon.
    """
    folder = run.folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (folder / LOG_NAME).open("w") as log:
        proc = subprocess.run(
            simulate_command(run, folder, audit), stdout=log, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.perf_counter() - started
    finished = proc.returncode == 0 or (audit > 0 and proc.returncode == 1)
    status = "ok" if finished and is_done(folder, audit) else "failed"
    return Outcome(run, status, seconds, proc.returncode)


def _report(outcome: Outcome, out_dir: Path, console: Console) -> None:
    if outcome.status == "ok":
        console.print(f"[green]ok[/green] {outcome.run.name} ({outcome.seconds:.0f} s)")
    else:
        log = outcome.run.folder(out_dir) / LOG_NAME
        code = outcome.returncode
        console.print(f"[red]failed[/red] {outcome.run.name} (exit {code}): see {log}")


def progress_bar(console: Console, label: str, unit: str) -> Progress:
    """A transient bar over a grid's runs or trials: label, bar, done / total, time elapsed."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def run_grid(
    runs: Sequence[Run],
    out_dir: Path,
    jobs: int = 1,
    console: Console | None = None,
    audit: int = 0,
) -> list[Outcome]:
    """Run every unfinished run, `jobs` at a time, with a progress bar over the runs.

    `audit` > 0: each run is a `fedpeft audit` with that many canaries.
    """
    console = console or Console(stderr=True)
    outcomes = {r.name: Outcome(r, "done") for r in runs if is_done(r.folder(out_dir), audit)}
    todo = [r for r in runs if r.name not in outcomes]
    if outcomes:
        console.print(f"{len(outcomes)} of {len(runs)} runs already done in {out_dir}: skipped")
    with (
        progress_bar(console, "compare", "runs") as progress,
        ThreadPoolExecutor(max_workers=jobs) as pool,
    ):
        bar = progress.add_task("compare", total=len(runs), completed=len(outcomes))
        futures = [pool.submit(run_one, r, out_dir, audit) for r in todo]
        try:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.run.name] = outcome
                progress.advance(bar)
                _report(outcome, out_dir, console)
        except BaseException:
            # interrupted (Ctrl-C reaches the running children too): start no further runs
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [outcomes[r.name] for r in runs]
