"""tracking.*: a real federation logged to TensorBoard and MLflow, read back from their files."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from fedpeft.cli import simulate
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.tracking import BACKENDS, TensorBoardTracker, Tracking, TrackingSettings, mlflow_store
from tests.conftest import FAST_RUN, REPO


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, data_dir):
    """One FAST_RUN federation with both backends on."""
    run_dir = tmp_path_factory.mktemp("tracked")
    summary = simulate(
        [*FAST_RUN, "tracking.tensorboard=true", "tracking.mlflow=true", f"run_dir={run_dir}"]
    )
    return summary, run_dir


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_tensorboard_events_hold_every_round_the_config_and_the_summary(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, run_dir = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2]
    assert [e.value for e in accuracy] == pytest.approx(summary["accuracy_by_round"], abs=1e-6)
    assert [e.step for e in events.Scalars("client_seconds")] == [1, 2]
    assert [e.value for e in events.Scalars("bytes_up")][1:] == [summary["bytes_up"] / 2] * 2
    final = events.Scalars("summary/final_accuracy")
    assert [(e.step, e.value) for e in final] == [(2, pytest.approx(summary["final_accuracy"]))]
    assert events.Scalars("summary/client_seconds")[0].value == pytest.approx(
        summary["client_seconds"], rel=1e-6
    )
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "strategy:" in text and "name: fedavg" in text
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"strategy.name" in hparams["_hparams_/experiment"]


def test_mlflow_run_holds_the_flat_config_and_every_round(tracked_run):
    summary, run_dir = tracked_run
    client = _mlflow_client(f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedpeft")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    params = run.data.params
    assert params["strategy.name"] == "fedavg" and params["federation.rounds"] == "2"
    assert params["model.name"] == "tiny_bert" and params["tracking.mlflow"] == "True"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == list(
        enumerate(pytest.approx(a) for a in summary["accuracy_by_round"])
    )
    seconds = client.get_metric_history(run.info.run_id, "client_seconds")
    assert sorted(m.step for m in seconds) == [1, 2] and all(m.value > 0 for m in seconds)
    assert run.data.metrics["summary/client_seconds"] == pytest.approx(summary["client_seconds"])
    assert run.data.metrics["summary/rounds_completed"] == 2


TRACKING_OFF = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from fedpeft import cli, server_app  # the server's side of a run: every module it imports
    from fedpeft.clients import simulation  # and the simulated clients' side
    from fedpeft.config import compose_config
    from fedpeft.tracking import Tracking
    tracking = Tracking.open(compose_config({overrides}), Path({run_dir!r}), 0)
    tracking.log_round({{"round": 1, "accuracy": 0.5, "client_seconds": 1.0}})
    tracking.finish({{"rounds_completed": 1, "final_accuracy": 0.5}})
    print(json.dumps([m for m in ("tensorboard", "mlflow") if m in sys.modules]))
    on = compose_config([*{overrides}, "tracking.tensorboard=true"])
    Tracking.open(on, Path({run_dir!r}) / "on", 0).finish({{"rounds_completed": 0}})
    print(json.dumps([m for m in ("tensorboard", "mlflow") if m in sys.modules]))
    """
)


def test_tracking_off_imports_neither_package(tmp_path):
    """With both extras installed, a run with tracking off never imports them (they cost
    start-up time): its modules, and the tracking calls the server makes every round. (A
    whole simulation in a fresh process here cost CI 35 s; the tracked run above is real.)"""
    proc = subprocess.run(
        [sys.executable, "-c", TRACKING_OFF.format(overrides=FAST_RUN, run_dir=str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    off, on = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert off == [] and on == ["tensorboard"]  # the check sees an import when there is one
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(("name", "module"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_backend_without_its_extra_is_a_one_line_error(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError) as exc:
        compose_config([f"tracking.{name}=true"])
    assert f"tracking.{name}=true" in str(exc.value) and 'pip install -e ".[track]"' in str(
        exc.value
    )
    assert "\n" not in str(exc.value)
    assert BACKENDS[name].module == module


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tracking.tensorboard=yes", "tracking.tensorboard=yes must be true or false"),
        ("tracking.mlflow=1", "tracking.mlflow=1 must be true or false"),
        ("tracking.mlflow_uri=http://mlflow:5000", "must be a local folder or a sqlite:/// URI"),
        ("tracking.mlflow_uri=file:///tmp/mlruns", "must be a local folder or a sqlite:/// URI"),
        ("tracking.mlflow_uri=''", "must be a local folder or a sqlite:/// URI"),
        ("tracking.experiment=''", "tracking.experiment= must be a non-empty name"),
    ],
)
def test_bad_tracking_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match="tracking") as exc:
        compose_config([override])
    assert message in str(exc.value)


def test_unknown_tracking_key_is_refused():
    with pytest.raises(ConfigError, match="tracking.wandb is unknown"):
        TrackingSettings.parse({"wandb": True})


def test_mlflow_store_is_sqlite_in_the_run_folder_or_a_shared_folder(tmp_path):
    uri, artifacts = mlflow_store(None, tmp_path / "run")
    assert uri == f"sqlite:///{(tmp_path / 'run' / 'mlruns' / 'mlflow.db').resolve()}"
    assert artifacts == (tmp_path / "run" / "mlruns" / "artifacts").resolve().as_uri()
    uri, _ = mlflow_store(str(tmp_path / "shared"), tmp_path / "run")
    assert uri == f"sqlite:///{(tmp_path / 'shared' / 'mlflow.db').resolve()}"
    assert mlflow_store("sqlite:///x.db", tmp_path)[0] == "sqlite:///x.db"


def test_runs_sharing_a_store_land_in_one_experiment(tmp_path):
    shared = tmp_path / "shared"
    cfg = compose_config(
        ["tracking.mlflow=true", f"tracking.mlflow_uri={shared}", "tracking.experiment=sweep"]
    )
    for name, accuracy in (("a", 0.6), ("b", 0.7)):
        tracking = Tracking.open(cfg, tmp_path / name, 0)
        tracking.log_round({"round": 1, "accuracy": accuracy, "failures": {}, "sampled": True})
        tracking.finish({"rounds_completed": 1, "final_accuracy": accuracy, "strategy": "x"})
    client = _mlflow_client(f"sqlite:///{shared / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted((r.info.run_name, r.data.metrics["accuracy"]) for r in runs) == [
        ("a", 0.6),
        ("b", 0.7),
    ]
    assert all("sampled" not in r.data.metrics and "failures" not in r.data.metrics for r in runs)


def test_a_failing_backend_is_dropped_and_the_others_go_on(tmp_path, caplog):
    cfg = compose_config(["tracking.tensorboard=true"])
    healthy = TensorBoardTracker(TrackingSettings(tensorboard=True), tmp_path, cfg, 0)
    broken = TensorBoardTracker(TrackingSettings(tensorboard=True), tmp_path / "b", cfg, 0)
    broken.writer.close()
    broken.log_round = lambda *_: (_ for _ in ()).throw(OSError("disk full"))
    tracking = Tracking({"broken": broken, "tensorboard": healthy})
    with caplog.at_level(logging.WARNING, logger="flwr"):  # simulate() quiets flwr
        tracking.log_round({"round": 1, "accuracy": 0.5})
        tracking.log_round({"round": 2, "accuracy": 0.6})
    assert list(tracking.trackers) == ["tensorboard"]
    assert "tracking.broken failed" in caplog.text and "disk full" in caplog.text
    tracking.finish({"rounds_completed": 2})

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("accuracy")] == [
        (1, 0.5),
        (2, pytest.approx(0.6)),
    ]
