"""fedpeft.compare.tuning: the protocol's settings, pruning a running trial, resuming a study."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fedpeft.cli import main
from fedpeft.compare.tuning import TuneSettings, _recover, _spent, open_study, run_trial
from fedpeft.errors import ConfigError
from tests.conftest import FAST_RUN

#: a stand-in federation: writes history.csv a round at a time (accuracies from argv), starts a
#: child that would outlive it, then summary.json; argv: folder, seconds per round, accuracies
FAKE_RUN = """
import csv, json, subprocess, sys, time
from pathlib import Path
folder, pause, accuracies = Path(sys.argv[1]), float(sys.argv[2]), [float(a) for a in sys.argv[3:]]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
(folder / "child.pid").write_text(str(child.pid))
rows = [{"round": 0, "accuracy": 0.5}]
for r, acc in enumerate(accuracies, 1):
    time.sleep(pause)
    rows.append({"round": r, "accuracy": acc})
    with (folder / ".h").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["round", "accuracy"]); w.writeheader(); w.writerows(rows)
    (folder / ".h").replace(folder / "history.csv")
(folder / "summary.json").write_text(json.dumps({"final_accuracy": accuracies[-1]}))
child.kill()
"""


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1)
    )


def _fake(tmp_path: Path, name: str, pause: float, *accuracies: float) -> tuple[list[str], Path]:
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    folder = tmp_path / name
    folder.mkdir()
    return [sys.executable, str(script), str(folder), str(pause), *map(str, accuracies)], folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited
        return fh.read().split()[2] != "Z"


def test_settings_from_the_command_line_and_a_study() -> None:
    assert TuneSettings.parse(None) is None
    assert TuneSettings.parse(None, "0") is None
    assert TuneSettings.parse({"trials": 8}, "0") is None  # tune=0 turns a study's tuning off
    assert TuneSettings.parse(None, "8") == TuneSettings(trials=8)
    study = {"trials": 4, "validation_fraction": 0.1, "prune_after": 3, "seed": 7}
    assert TuneSettings.parse(study, "6") == TuneSettings(6, 0.1, None, 7, 3)
    capped = TuneSettings.parse({"trials": 2, "validation_examples": 872})
    assert capped.validation_examples == 872


@pytest.mark.parametrize(
    ("raw", "trials", "message"),
    [
        (None, "-1", "trials='-1' must be an integer >= 1"),
        (None, "eight", "trials='eight' must be an integer"),
        (None, "8.5", "trials='8.5' must be an integer"),
        ({"trials": True}, None, "trials=True must be an integer"),
        ({"trials": 4, "prune_after": 0}, None, "prune_after=0 must be an integer >= 1"),
        ({"trials": 4, "validation_examples": 0}, None, "validation_examples=0 must be"),
        ({"trials": 4, "validation_fraction": 1.0}, None, "validation_fraction=1.0 must be in"),
        ({"trials": 4, "validation_fraction": "nan"}, None, "validation_fraction=nan must be in"),
        ({"trials": 4, "lr": [1, 2]}, None, "unknown key 'lr'"),
    ],
)
def test_bad_settings_are_refused_naming_the_fix(raw, trials, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TuneSettings.parse(raw, trials)


def test_a_trial_behind_the_median_is_pruned_and_its_processes_end(tmp_path) -> None:
    study = _study()
    command, folder = _fake(tmp_path, "good", 0.1, 0.8, 0.9)
    first = study.ask()
    assert run_trial(first, command, folder) == pytest.approx(0.9)
    study.tell(first, 0.9)
    command, folder = _fake(tmp_path, "bad", 0.1, *[0.1] * 100)
    started = time.perf_counter()
    second = study.ask()
    with pytest.raises(optuna.TrialPruned, match="round 1: 0.1000"):
        run_trial(second, command, folder)
    assert time.perf_counter() - started < 8  # stopped after round 1, not 100 rounds later
    assert not (folder / "summary.json").exists()
    child = int((folder / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the pruned trial's process group outlived it"


@pytest.mark.parametrize("prune_after", [1, 2, 3])
def test_no_trial_is_pruned_before_round_prune_after(tmp_path, prune_after) -> None:
    settings = TuneSettings(trials=3, prune_after=prune_after, startup_trials=1)
    study = open_study(settings, tmp_path)
    good = study.ask()
    for step in (1, 2, 3):
        good.report(0.9, step)
    study.tell(good, 0.9)
    bad = study.ask()
    for step in (1, 2, 3):
        bad.report(0.1, step)
        assert bad.should_prune() == (step >= prune_after), step


def test_a_failed_run_scores_nothing(tmp_path) -> None:
    folder = tmp_path / "crash"
    folder.mkdir()
    command = [sys.executable, "-c", "raise SystemExit(3)"]
    assert run_trial(_study().ask(), command, folder) is None


def test_an_interrupted_trial_is_rerun_with_its_values_and_does_not_spend_the_budget() -> None:
    study = _study()
    done = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study.tell(done, 0.7)
    cut = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    assert _spent(study) == 1
    _recover(study)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert _spent(study) == 1
    rerun = study.ask()
    value = rerun.suggest_float("train.lr", 1e-4, 1e-2, log=True)  # the enqueued value
    assert value == pytest.approx(cut.params["train.lr"])
    assert rerun.user_attrs == {"rerun_of": cut.number}


def test_compare_tunes_on_validation_then_scores_the_tuned_runs_on_test(tmp_path, capsys):
    out = tmp_path / "tuned"
    grid = [*FAST_RUN, "federation.rounds=1", "strategy=fedavg", "seed=0", f"out_dir={out}"]
    assert main(["compare", *grid, "tune=1", "tracking.mlflow=true"]) == 0
    (row,) = json.loads((out / "tuned.json").read_text())
    assert row["strategy"] == "fedavg"
    assert row["trials"] == {"complete": 1, "pruned": 0, "failed": 0}
    trials = sorted((out / "tuning").glob("*/trial-*/config.yaml"))
    assert len(trials) == 1  # one trial keeps CI short; TPE and pruning: tests above
    tried = set()
    for path in trials:
        cfg = OmegaConf.load(path)
        assert cfg.seed == 0 and cfg.dataset.validation_fraction == 0.2
        assert 3e-4 <= cfg.train.lr <= 3e-2  # two decades around fedavg's own 3e-3
        tried.add(cfg.train.lr)
    assert row["values"]["train.lr"] in tried
    (final,) = list(out.glob("run-*/config.yaml"))  # nothing swept but the one seed
    cfg = OmegaConf.load(final)
    assert cfg.train.lr == row["values"]["train.lr"]
    assert cfg.dataset.validation_fraction is None  # the final run is scored on the test split
    from mlflow.tracking import MlflowClient  # the study's one store holds the scored run only

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedpeft-compare")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == final.parent.name
    assert logged.data.params["train.lr"] == str(cfg.train.lr)
    (tried,) = list(csv.DictReader((out / "trials.csv").open()))
    assert tried["state"] == "complete" and json.loads(tried["values"]) == row["values"]
    assert float(tried["validation_accuracy"]) == row["validation_accuracy"]
    assert list(json.loads(tried["accuracy_by_round"])) == ["1"]  # reported for pruning
    table = (out / "results.md").read_text()
    assert "## Tuned values" in table and "train.lr=" in table and "1 / 0 / 0" in table
    # a rerun finds the finished trials and the tuned run: nothing runs again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert main(["compare", *grid, "tune=1"]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert "1 of 1 runs already done" in capsys.readouterr().err


def _processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_text().replace("\0", " "):
                found.append(int(proc.name))
        except OSError:
            continue
    return [pid for pid in found if _alive(pid)]


def test_sigterm_to_compare_ends_the_running_trial_too(tmp_path) -> None:
    import signal
    import subprocess

    out = tmp_path / "stopped"
    grid = [*FAST_RUN, "strategy=fedavg", "seed=0", f"out_dir={out}", "tune=2"]
    compare = subprocess.Popen(
        [sys.executable, "-m", "fedpeft.cli", "compare", *grid],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("tuning/*/trial-0/simulate.log")) and time.monotonic() < deadline:
        time.sleep(0.2)
    trial = next(out.glob("tuning/*/trial-0"))
    assert _processes_naming(str(trial)), "the trial was not running"
    compare.send_signal(signal.SIGTERM)
    _, err = compare.communicate(timeout=60)
    assert compare.returncode == 130
    assert "compare interrupted: rerun the same command to resume" in err
    assert "Traceback" not in err
    deadline = time.monotonic() + 30
    while _processes_naming(str(trial)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_naming(str(trial)), "the trial outlived compare"
    assert not (trial / "summary.json").exists()
