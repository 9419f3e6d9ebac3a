"""`fedpeft compare tune=`: each method's hyperparameters searched by one protocol, then scored.

For each configuration of the grid (its swept values other than the seed), an Optuna study
searches the method's own space (`search_space` on its strategy class, fedpeft/search_space.py)
with the same number of trials for every method. A trial is a real federation at the tuning seed
scored on a validation split carved from the training data (`dataset.validation_fraction`), never
on the held-out test split; TPE proposes the values and a median pruner stops a trial whose
validation accuracy after a round trails the median of earlier trials at that round. The best
values are then added to every seed's final run, which is scored on the test split as usual.

Each configuration's study lives in SQLite under <out_dir>/tuning/<config>/, so an interrupted
tuning resumes: finished trials count, a trial cut off mid-run is run again with the same values.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState
from rich.console import Console

from fedpeft.compare.aggregate import markdown_table
from fedpeft.compare.cells import progress_bar
from fedpeft.compare.grid import Run, config_digest, merge, slug
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.search_space import Choice, Scale
from fedpeft.strategies import STRATEGIES

SEED = "seed"
#: seconds between looks at a running trial's history.csv
POLL_S = 2.0
#: seconds a pruned trial gets to stop on SIGTERM before SIGKILL
STOP_GRACE_S = 20.0
#: trial states that spend the budget (a trial cut off by an interruption does not)
SPENT = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class TuneSettings:
    """The protocol: trials per configuration, the validation split, the seed, the pruning."""

    trials: int
    validation_fraction: float = 0.2
    #: cap on the validation examples a trial scores (dataset.max_test_examples; None: all)
    validation_examples: int | None = None
    seed: int = 0
    #: the first round at which a trial may be pruned
    prune_after: int = 2
    startup_trials: int = 3

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, trials: str | None = None) -> TuneSettings | None:
        """From a study's `tune:` mapping and/or the command line's `tune=<trials>` (0: off)."""
        values = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"tune: unknown key {unknown[0]!r}, use {sorted(known)}")
        if trials is not None:
            values["trials"] = trials
        if not values or str(values.get("trials", "0")) == "0":
            return None
        try:
            settings = cls(
                trials=_integer(values["trials"], "trials", 1),
                validation_fraction=float(values.get("validation_fraction", 0.2)),
                validation_examples=(
                    None
                    if values.get("validation_examples") is None
                    else _integer(values["validation_examples"], "validation_examples", 1)
                ),
                seed=_integer(values.get("seed", 0), "seed", 0),
                prune_after=_integer(values.get("prune_after", 2), "prune_after", 1),
                startup_trials=_integer(values.get("startup_trials", 3), "startup_trials", 1),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"tune: {exc}: e.g. tune=8 or a study's tune: {{trials: 8}}") from exc
        fraction = settings.validation_fraction
        if not (math.isfinite(fraction) and 0 < fraction < 1):
            raise ConfigError(f"tune: validation_fraction={fraction} must be in (0, 1), e.g. 0.2")
        return settings


def _integer(value: Any, name: str, least: int) -> int:
    try:
        number = int(str(value).strip())  # "8" and 8, not 8.5 or True
    except ValueError:
        number = least - 1
    if number < least:
        raise ValueError(f"{name}={value!r} must be an integer >= {least}")
    return number


@dataclass
class Tuned:
    """One configuration's tuning: its space, the chosen values and how the trials went."""

    config: tuple[tuple[str, str], ...]
    strategy: str
    space: dict[str, str]
    values: dict[str, Any] = field(default_factory=dict)
    validation_accuracy: float | None = None
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    seconds: float = 0.0

    def overrides(self) -> list[str]:
        """The chosen values as Hydra overrides for the final runs."""
        return [f"{key}={value!r}" for key, value in self.values.items()]


def group_runs(runs: Sequence[Run]) -> dict[tuple, list[Run]]:
    """The grid's runs by configuration: their swept values other than the seed."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        config = tuple((k, v) for k, v in run.swept if k != SEED)
        groups.setdefault(config, []).append(run)
    return groups


def trial_overrides(run: Run, settings: TuneSettings) -> list[str]:
    """A configuration's overrides for its trials: the tuning seed and the validation split.

    Trials log to no tracker: a study's MLflow experiment holds its scored runs only.
    """
    extra = [
        f"seed={settings.seed}",
        f"dataset.validation_fraction={settings.validation_fraction}",
        "tracking.tensorboard=false",
        "tracking.mlflow=false",
    ]
    if settings.validation_examples is not None:
        extra.append(f"dataset.max_test_examples={settings.validation_examples}")
    return merge(run.overrides, extra)


def with_values(run: Run, overrides: Sequence[str]) -> Run:
    """`run` with the tuned values added (a new config, so a new folder and hash)."""
    merged = merge(run.overrides, overrides)
    return Run(tuple(merged), run.swept, config_digest(compose_config(merged)))


def _read_rounds(folder: Path) -> list[tuple[int, float]]:
    """(round, accuracy) of the evaluated rounds after round 0 in a running trial's history."""
    path = folder / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        (int(r["round"]), float(r["accuracy"]))
        for r in rows
        if r.get("accuracy") and int(r["round"]) > 0
    ]


def _stop(proc: subprocess.Popen) -> None:
    """End a trial's process group (its Ray workers too): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def trial_command(overrides: Sequence[str], folder: Path) -> list[str]:
    """The `fedpeft simulate` command line of one trial, its run folder quoted for Hydra."""
    return [sys.executable, "-m", "fedpeft.cli", "simulate", *overrides, f"run_dir='{folder}'"]


def run_trial(
    trial: optuna.Trial, command: Sequence[str], folder: Path, stop: threading.Event | None = None
) -> float | None:
    """Run one trial's federation, reporting each evaluated round; prune it if the pruner says.

    `command` writes its run folder (history.csv per round, summary.json at the end) in
    `folder`. Returns the final validation accuracy, or None when the run failed (see its log).
    When `stop` is set (compare was interrupted) the trial's processes end and KeyboardInterrupt
    is raised; the trial stays "running" in the study, to be run again on resume.
    """
    folder.mkdir(parents=True, exist_ok=True)
    reported = 0
    with (folder / "simulate.log").open("w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while True:
                finished = proc.poll() is not None
                for server_round, accuracy in _read_rounds(folder):
                    if server_round > reported:
                        trial.report(accuracy, server_round)
                        reported = server_round
                        if trial.should_prune():
                            _stop(proc)
                            raise optuna.TrialPruned(f"round {server_round}: {accuracy:.4f}")
                if finished:
                    break
                if stop is not None and stop.wait(POLL_S):
                    raise KeyboardInterrupt("compare was interrupted")
                if stop is None:
                    time.sleep(POLL_S)
        except BaseException:
            _stop(proc)
            raise
    summary = folder / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        return None
    accuracy = json.loads(summary.read_text()).get("final_accuracy")
    return None if accuracy is None else float(accuracy)


def _recover(study: optuna.Study) -> None:
    """Trials left running by an interruption: failed, and their values run again first."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})


def _spent(study: optuna.Study) -> int:
    counted = study.get_trials(deepcopy=False, states=(*SPENT, TrialState.FAIL))
    return sum(1 for t in counted if t.state in SPENT or t.user_attrs.get("failed_run"))


@dataclass(frozen=True)
class Search:
    """One configuration's search, planned in the main thread (Hydra compose is not thread-safe)."""

    config: tuple[tuple[str, str], ...]
    base: tuple[str, ...]
    strategy: str
    space: dict[str, Scale | Choice]
    centre: dict[str, Any]
    folder: Path


def plan_search(config: tuple, run: Run, settings: TuneSettings, root: Path) -> Search:
    """The trials' base overrides, the method's space and the values its ranges centre on.

    The folder is named by the swept values and a hash of the trials' base config, so a changed
    grid starts a new study rather than mixing trials of two configurations.
    """
    base = trial_overrides(run, settings)
    cfg = compose_config(base)
    space = dict(STRATEGIES[cfg.strategy.name].search_space)
    centre = {key: OmegaConf.select(cfg, key) for key in space}
    folder = root / f"{slug(config)}-{config_digest(cfg)}"
    return Search(config, tuple(base), cfg.strategy.name, space, centre, folder)


def open_study(settings: TuneSettings, folder: Path) -> optuna.Study:
    """A configuration's study in <folder>/optuna.db (created, or loaded to resume).

    TPE seeded by the tuning seed, its first `startup_trials` proposals at random; the median
    pruner compares from round `prune_after` on (Optuna's warm-up is the first prunable step).
    """
    return optuna.create_study(
        study_name="tune",
        storage=f"sqlite:///{folder / 'optuna.db'}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=settings.seed, n_startup_trials=settings.startup_trials
        ),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=settings.prune_after
        ),
        load_if_exists=True,
    )


def tune_config(
    search: Search,
    settings: TuneSettings,
    console: Console,
    advance: Callable[[int], None],
    stop: threading.Event | None = None,
) -> Tuned:
    """Run one configuration's trials until `settings.trials` have spent the budget."""
    space, folder = search.space, search.folder
    tuned = Tuned(search.config, search.strategy, {k: r.describe() for k, r in space.items()})
    folder.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, folder)
    _recover(study)
    advance(_spent(study))
    while _spent(study) < settings.trials:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt("compare was interrupted")
        trial = study.ask()
        values = {key: r.suggest(trial, key, search.centre[key]) for key, r in space.items()}
        overrides = merge(search.base, [f"{k}={v!r}" for k, v in values.items()])
        started = time.perf_counter()
        try:
            trial_dir = folder / f"trial-{trial.number}"
            accuracy = run_trial(trial, trial_command(overrides, trial_dir), trial_dir, stop)
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("seconds", time.perf_counter() - started)
            study.tell(trial, state=TrialState.PRUNED)
            console.print(
                f"[yellow]pruned[/yellow] {tuned.strategy} trial {trial.number} {values} ({pruned})"
            )
        else:
            trial.set_user_attr("seconds", time.perf_counter() - started)
            if accuracy is None:
                trial.set_user_attr("failed_run", True)
                study.tell(trial, state=TrialState.FAIL)
                console.print(
                    f"[red]failed[/red] {tuned.strategy} trial {trial.number}: see {folder}"
                )
            else:
                study.tell(trial, accuracy)
                console.print(f"{tuned.strategy} trial {trial.number} {values}: {accuracy:.4f}")
        advance(1)
    trials = study.get_trials(deepcopy=False)
    tuned.complete = sum(t.state == TrialState.COMPLETE for t in trials)
    tuned.pruned = sum(t.state == TrialState.PRUNED for t in trials)
    tuned.failed = sum(bool(t.user_attrs.get("failed_run")) for t in trials)
    tuned.seconds = sum(t.user_attrs.get("seconds", 0.0) for t in trials)
    if tuned.complete:
        tuned.values = dict(study.best_trial.params)
        tuned.validation_accuracy = study.best_value
    return tuned


def tune_grid(
    runs: Sequence[Run],
    out_dir: Path,
    settings: TuneSettings,
    jobs: int = 1,
    console: Console | None = None,
) -> tuple[list[Run], list[Tuned]]:
    """Tune every configuration (`jobs` at a time), then the grid's runs with the chosen values."""
    console = console or Console(stderr=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    groups = group_runs(runs)
    root = out_dir / "tuning"
    stop = threading.Event()
    console.print(
        f"[bold]tuning[/bold] {len(groups)} configurations x {settings.trials} trials on a "
        f"{settings.validation_fraction:g} validation split of the training data "
        f"(seed {settings.seed})"
    )
    with (
        progress_bar(console, "tune", "trials") as progress,
        ThreadPoolExecutor(jobs) as pool,
    ):
        bar = progress.add_task("tune", total=len(groups) * settings.trials)

        def advance(n: int) -> None:
            progress.advance(bar, n)

        searches = [
            plan_search(config, group[0], settings, root) for config, group in groups.items()
        ]
        futures = {
            search.config: pool.submit(tune_config, search, settings, console, advance, stop)
            for search in searches
        }
        try:
            results = {config: future.result() for config, future in futures.items()}
        except BaseException:  # interrupted: the running trials end, no further one starts
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    tuned_runs = []
    for config, group in groups.items():
        extra = results[config].overrides()
        tuned_runs += [with_values(run, extra) if extra else run for run in group]
    return tuned_runs, list(results.values())


def write_trials(tuning_dir: Path, path: Path) -> Path:
    """trials.csv: every trial of every configuration's study so far, one row each.

    Reads the studies' databases (<out_dir>/tuning/*/optuna.db), so it also reports a tuning
    that was interrupted: the values tried, the trial's state, its validation accuracy by round
    and at the end, and its wall time.
    """
    rows = []
    for db in sorted(tuning_dir.glob("*/optuna.db")):
        study = optuna.load_study(study_name="tune", storage=f"sqlite:///{db}")
        for t in study.get_trials(deepcopy=False):
            rows.append(
                {
                    "configuration": db.parent.name,
                    "trial": t.number,
                    "state": t.state.name.lower(),
                    "values": json.dumps(t.params, sort_keys=True),
                    "accuracy_by_round": json.dumps(
                        {int(k): round(v, 6) for k, v in sorted(t.intermediate_values.items())}
                    ),
                    "validation_accuracy": t.value,
                    "seconds": round(t.user_attrs.get("seconds", 0.0), 1),
                }
            )
    fields = ["configuration", "trial", "state", "values", "accuracy_by_round"]
    fields += ["validation_accuracy", "seconds"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tuned(tuned: Sequence[Tuned], path: Path) -> Path:
    """tuned.json: every configuration's space, chosen values and trial counts."""
    rows = [
        {
            "config": dict(t.config),
            "strategy": t.strategy,
            "space": t.space,
            "values": t.values,
            "validation_accuracy": t.validation_accuracy,
            "trials": {"complete": t.complete, "pruned": t.pruned, "failed": t.failed},
            "trial_seconds": round(t.seconds, 1),
        }
        for t in tuned
    ]
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def tuned_section(tuned: Sequence[Tuned], settings: TuneSettings) -> str:
    """results.md's "Tuned values" section: the protocol, then a row per configuration."""
    header = [
        "configuration",
        "method",
        "searched",
        "chosen",
        "validation accuracy",
        "trials (done / pruned / failed)",
        "trial time (s)",
    ]
    rows = [
        [
            ", ".join(f"{k}={v}" for k, v in t.config) or "—",
            t.strategy,
            "; ".join(f"{k}: {d}" for k, d in t.space.items()),
            ", ".join(f"{k}={_short(v)}" for k, v in t.values.items()) or "none finished: defaults",
            "—" if t.validation_accuracy is None else f"{t.validation_accuracy:.4f}",
            f"{t.complete} / {t.pruned} / {t.failed}",
            f"{t.seconds:.0f}",
        ]
        for t in tuned
    ]
    intro = (
        f"Every configuration had {settings.trials} trials (Optuna TPE, {settings.startup_trials} "
        f"random first; a trial behind the median of earlier ones at the same round stopped from "
        f"round {settings.prune_after} on), each a federation at seed {settings.seed} scored on "
        f"a {settings.validation_fraction:g} validation split carved from the training data"
        + (
            f" ({settings.validation_examples} of its examples)"
            if settings.validation_examples
            else ""
        )
        + "; the test split scored only the final runs above.\n"
    )
    return "## Tuned values\n\n" + intro + "\n" + markdown_table(header, rows)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
