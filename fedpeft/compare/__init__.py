"""`fedpeft compare`: run a grid of federations and leave results.csv, a table and plots.

    fedpeft compare strategy=fedavg,ffa_lora,fedsvd seed=0,1,2 out_dir=runs/cmp [jobs=2]
    fedpeft compare study=fedsvd_table2_small [federation.rounds=20]

Besides Hydra overrides (comma lists sweep) it takes `out_dir=` (required unless the study names
one), `jobs=` (runs at a time, default 1), `target=` (accuracy for "rounds to target") and
`study=` (a packaged study or a study YAML; later overrides replace the study's), `audit=`
(a canary count: every run is a `fedpeft audit`, and the table shows its audited epsilon bound)
and `baseline=` (the strategy the paired differences are taken from; default fedavg when in the
grid, else its first strategy). Besides results.csv it writes paired.csv (paired differences from
the baseline, fedpeft/compare/paired.py) and budget.csv (accuracy at matched rounds, bytes,
client compute and epsilon, fedpeft/compare/budget.py), both also sections of results.md.
`tune=<trials>` (or a study's `tune:` mapping) first tunes every configuration's method on a
validation split with that many Optuna trials and runs the grid with the chosen values
(fedpeft/compare/tuning.py: tuned.json, trials.csv with every trial, and a "Tuned values"
section); `tune=0` turns it off.
With `tracking.mlflow=true` every run logs into one MLflow store, <out_dir>/mlruns, under an
experiment named after the study; with `tracking.tensorboard=true`, `tensorboard --logdir
<out_dir>` shows every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fedpeft import tracking
from fedpeft.compare import aggregate, budget, paired, plots, tuning
from fedpeft.compare.cells import Outcome, run_grid
from fedpeft.compare.grid import Run, expand, merge
from fedpeft.compare.studies import load_study
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError

OPTIONS = ("out_dir", "jobs", "target", "study", "audit", "baseline", "tune")


@dataclass
class CompareResult:
    """The grid's outcomes and the files it wrote."""

    outcomes: list[Outcome]
    results_csv: Path
    table: Path
    plots: list[Path]
    #: paired.csv and budget.csv
    csvs: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        """Runs that did not finish."""
        return [o for o in self.outcomes if o.status == "failed"]


def split_options(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Separate compare's own options from the Hydra overrides."""
    options, overrides = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    return options, overrides


def _number(options: dict[str, str], key: str, kind: type, default, check, hint: str):
    if key not in options:
        return default
    try:
        value = kind(options[key])
    except ValueError:
        value = None
    if value is None or not check(value):
        raise ConfigError(f"{key}={options[key]} must be {hint}")
    return value


def compare(args: Sequence[str], console: Console | None = None) -> CompareResult:
    """Expand the grid, run what is not done, then write results.csv, results.md and plots."""
    console = console or Console(stderr=True)
    options, overrides = split_options(args)
    study = load_study(options["study"]) if "study" in options else None
    out_dir = options.get("out_dir") or (study.out_dir if study else None)
    if not out_dir:
        raise ConfigError("out_dir is not set: give out_dir=<folder> for the grid's runs")
    if "'" in out_dir or "\\" in out_dir:
        raise ConfigError(f"out_dir={out_dir} holds a quote or backslash: choose a plainer path")
    jobs = _number(options, "jobs", int, 1, lambda v: v >= 1, "an integer >= 1, e.g. jobs=2")
    default_target = study.target if study and study.target else aggregate.DEFAULT_TARGET
    target = _number(
        options, "target", float, default_target, lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.8"
    )
    audit = _number(
        options,
        "audit",
        int,
        0,
        lambda v: v == 0 or 2 <= v <= 100_000,
        "0 (no audit) or a canary count in [2, 100000], e.g. audit=1000",
    )
    settings = tuning.TuneSettings.parse(study.tune if study else None, options.get("tune"))
    grid = merge(study.overrides, overrides) if study else overrides
    runs = expand(grid, study.strategy_overrides if study else None)
    baseline = paired.choose_baseline(paired.grid_strategies(runs), options.get("baseline"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"fedpeft compare: {study.name}" if study else "fedpeft compare"
    runs = _share_tracking(runs, out, study.name if study else "fedpeft-compare")
    sections = []
    if settings is not None:
        runs, tuned = tuning.tune_grid(runs, out, settings, jobs=jobs, console=console)
        tuning.write_tuned(tuned, out / "tuned.json")
        tuning.write_trials(out / "tuning", out / "trials.csv")
        sections.append(tuning.tuned_section(tuned, settings))
    console.print(f"[bold]{title}[/bold]: {len(runs)} runs in {out}, {jobs} at a time")
    outcomes = run_grid(runs, out, jobs=jobs, console=console, audit=audit)
    results = aggregate.load_results(runs, out)
    csv_path = aggregate.write_results_csv(results, out / "results.csv", target)
    differences = paired.paired_differences(results, baseline)
    matched = budget.budget_rows(results, target)
    csvs = [
        paired.write_csv(differences, out / "paired.csv"),
        budget.write_csv(matched, out / "budget.csv"),
    ]
    sections += [paired.markdown(differences, baseline), budget.markdown(matched, target)]
    table = aggregate.write_table(
        results,
        out / "results.md",
        target,
        title,
        study.description if study else "",
        grid,
        sections,
    )
    made = []
    if any(r.done for r in results):
        made = [
            plots.accuracy_by_round(results, out / "accuracy_by_round.png"),
            plots.accuracy_vs_bytes(results, out / "accuracy_vs_bytes.png"),
        ]
    return CompareResult(outcomes, csv_path, table, made, csvs)


def _share_tracking(runs: Sequence[Run], out: Path, experiment: str) -> list[Run]:
    """With MLflow on, point every run at one store under out_dir (created here, once).

    Tracking keys are not part of a run's hash (grid.IGNORED): the runs keep their folders.
    """
    cfg = compose_config(list(runs[0].overrides))
    if not cfg.tracking.mlflow or cfg.tracking.mlflow_uri is not None:
        return list(runs)
    store = (out / "mlruns").resolve()
    name = experiment if cfg.tracking.experiment == "fedpeft" else cfg.tracking.experiment
    tracking.create_mlflow_store(str(store), name)
    extra = [f"tracking.mlflow_uri='{store}'", f"tracking.experiment={name}"]
    return [Run(tuple(merge(r.overrides, extra)), r.swept, r.digest) for r in runs]
