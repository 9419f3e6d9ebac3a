"""Experiment tracking: a run's config, history and summary in TensorBoard or MLflow.

Offline, local files only. Each backend is one `Tracker` in `BACKENDS`; `Tracking` drives those
the config turns on. A backend logs the resolved config when the run starts, every numeric
history.csv column after each round (step: the round) and the summary's numbers at the end
(`summary/<key>`). Neither backend is imported unless it is on (both are the `track` extra).
history.csv stays the record: a backend that fails during the run is turned off with a warning
and the federation goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from logging import WARNING
from pathlib import Path
from typing import Any, ClassVar

from flwr.supercore import log
from omegaconf import DictConfig, OmegaConf

from fedpeft.errors import ConfigError
from fedpeft.extras import require
from fedpeft.run_folder import HISTORY_FIELDS

#: where TensorBoard's event files go in the run folder
TENSORBOARD_DIR = "tensorboard"
#: the MLflow store of a run without tracking.mlflow_uri, in the run folder
MLFLOW_DIR = "mlruns"
#: prefix of the summary's numbers among the logged metrics
SUMMARY_PREFIX = "summary/"


@dataclass(frozen=True)
class TrackingSettings:
    """`tracking.*`: which backends are on, MLflow's store and experiment."""

    tensorboard: bool = False
    mlflow: bool = False
    #: a folder (the store is <folder>/mlflow.db) or a sqlite:/// URI; None: <run_dir>/mlruns
    mlflow_uri: str | None = None
    experiment: str = "fedpeft"

    @classmethod
    def parse(cls, raw: object) -> TrackingSettings:
        """Validate `tracking.*` and require the extra of each backend that is on."""
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"tracking={raw} must be a mapping, e.g. tracking.mlflow=true")
        values = dict(raw or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(
                f"tracking.{unknown[0]} is unknown: tracking has "
                + ", ".join(f.name for f in fields(cls))
            )
        for name in BACKENDS:
            flag = values.get(name, False)
            if not isinstance(flag, bool):
                raise ConfigError(f"tracking.{name}={flag} must be true or false")
        uri = values.get("mlflow_uri")
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri) if isinstance(uri, str) else None
        if uri is not None and (
            not isinstance(uri, str)
            or not uri.strip()
            or (scheme is not None and not uri.startswith("sqlite:///"))
        ):
            raise ConfigError(
                f"tracking.mlflow_uri={uri} must be a local folder or a sqlite:/// URI (tracking "
                "is offline), e.g. tracking.mlflow_uri=runs/mlflow, or null for <run_dir>/mlruns"
            )
        experiment = values.get("experiment", "fedpeft")
        if not isinstance(experiment, str) or not experiment.strip():
            raise ConfigError(
                f"tracking.experiment={experiment} must be a non-empty name, e.g. fedpeft"
            )
        settings = cls(
            tensorboard=values.get("tensorboard", False),
            mlflow=values.get("mlflow", False),
            mlflow_uri=uri,
            experiment=experiment,
        )
        for name in settings.backends():
            require(BACKENDS[name].module, f"tracking.{name}=true (or set tracking.{name}=false)")
        return settings

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrackingSettings:
        """The run's `tracking` section (all off when the config has none), validated."""
        node = OmegaConf.select(cfg, "tracking")
        return cls.parse(
            OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        )

    def backends(self) -> list[str]:
        """The names of the backends that are on, in BACKENDS order."""
        return [name for name in BACKENDS if getattr(self, name)]


class Tracker(ABC):
    """One tracking backend of one run: opened when the run starts, finished at its end."""

    #: the importable module of the backend's package (an optional extra: extras.EXTRAS)
    module: ClassVar[str]

    @abstractmethod
    def __init__(self, settings: TrackingSettings, run_dir: Path, cfg: DictConfig, first: int):
        """Open the backend's store and log the run's resolved config (`first`: first round)."""

    @abstractmethod
    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        """Log one round's numeric history columns at step `server_round`."""

    @abstractmethod
    def finish(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log the summary's numbers (keys already prefixed) and close the backend."""


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys; lists and other non-scalars as JSON text."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, str | int | float | bool) or node is None:
            out[prefix[:-1]] = node
        else:
            out[prefix[:-1]] = json.dumps(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def numbers(values: Mapping[str, Any], keys: Iterable[str]) -> dict[str, float]:
    """The finite numeric values among `keys` of `values` (bools and None left out)."""
    return {
        k: float(v)
        for k in keys
        if isinstance(v := values.get(k), int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


class TensorBoardTracker(Tracker):
    """Event files in <run_dir>/tensorboard: config as text, history as scalars, hparams at end."""

    module = "tensorboard"

    def __init__(self, settings: TrackingSettings, run_dir: Path, cfg: DictConfig, first: int):
        """Open a SummaryWriter; a resumed run purges events from its first round on."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=first if first > 0 else None
        )
        self.hparams = flat_config(cfg)
        text = OmegaConf.to_yaml(cfg, resolve=True)
        self.writer.add_text(
            "config", "".join(f"    {line}\n" for line in text.splitlines()), global_step=first
        )
        self.writer.flush()

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        """One scalar per column; flushed so that a crashed run keeps its rounds."""
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, server_round)
        self.writer.flush()

    def finish(self, step: int, scalars: Mapping[str, float]) -> None:
        """The config as hparams with the summary's numbers as their metrics, in the same run."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(self.hparams, dict(scalars)):
            self.writer.file_writer.add_summary(summary, step)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run (named after the run folder) in a local SQLite store.

    MLflow 3 refuses its plain file store unless MLFLOW_ALLOW_FILE_STORE is set, so the store is
    SQLite: <folder>/mlflow.db. A resumed run logs its remaining rounds as a new MLflow run of the
    same name, tagged `fedpeft.resumed_from_round`.
    """

    module = "mlflow"

    def __init__(self, settings: TrackingSettings, run_dir: Path, cfg: DictConfig, first: int):
        """Open (or create) the store and experiment, start the run and log the config."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: no usage pings
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        uri, artifacts = mlflow_store(settings.mlflow_uri, run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        experiment_id = self._experiment(settings.experiment, artifacts)
        tags = {"fedpeft.run_dir": str(run_dir.resolve())}
        if first > 1:
            tags["fedpeft.resumed_from_round"] = str(first - 1)
        self.run_id = self.client.create_run(
            experiment_id, run_name=run_dir.resolve().name, tags=tags
        ).info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flat_config(cfg).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            batch = params[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(self.run_id, params=batch)

    def _experiment(self, name: str, artifacts: str) -> str:
        """The experiment's id, created if new (a run sharing the store may create it first)."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        """The round's columns as metrics at step `server_round`."""
        self._log(server_round, scalars)

    def finish(self, step: int, scalars: Mapping[str, float]) -> None:
        """The summary's numbers, then the run is marked finished."""
        self._log(step, scalars)
        self.client.set_terminated(self.run_id, "FINISHED")


def mlflow_store(uri: str | None, run_dir: Path) -> tuple[str, str]:
    """The tracking URI and a new experiment's artifact location for `tracking.mlflow_uri`."""
    if uri is not None and uri.startswith("sqlite:///"):
        return uri, (run_dir / MLFLOW_DIR / "artifacts").resolve().as_uri()
    folder = Path(uri) if uri is not None else run_dir / MLFLOW_DIR
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def create_mlflow_store(uri: str, experiment: str) -> None:
    """Create a shared store and its experiment once, before parallel runs log into it."""
    require("mlflow", "tracking.mlflow")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    tracking_uri, artifacts = mlflow_store(uri, Path(uri))
    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifacts)


#: tracking.<name> -> its backend
BACKENDS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
}


class Tracking:
    """The backends a run's config turns on (none: every call does nothing)."""

    def __init__(self, trackers: Mapping[str, Tracker]):
        self.trackers = dict(trackers)

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, first: int) -> Tracking:
        """Open each backend `cfg.tracking` turns on; `first` is the run's first round (0: new).

        A store that cannot be opened is a ConfigError naming the backend, before round 0.
        """
        settings = TrackingSettings.from_config(cfg)
        trackers = {}
        for name in settings.backends():
            try:
                trackers[name] = BACKENDS[name](settings, run_dir, cfg, first)
            except Exception as exc:
                raise ConfigError(
                    f"tracking.{name}=true: could not open its store ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); fix the path or set "
                    f"tracking.{name}=false"
                ) from exc
        return cls(trackers)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log the row's numeric history columns at step `row["round"]`."""
        scalars = numbers(row, [k for k in HISTORY_FIELDS if k != "round"])
        self._each("log_round", int(row["round"]), scalars)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Log the summary's top-level numbers at the last round and close every backend."""
        scalars = {f"{SUMMARY_PREFIX}{k}": v for k, v in numbers(summary, summary).items()}
        self._each("finish", int(summary.get("rounds_completed") or 0), scalars)
        self.trackers.clear()

    def _each(self, method: str, step: int, scalars: Mapping[str, float]) -> None:
        """Call `method` on every backend; one that fails is dropped with a warning."""
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(step, scalars)
            except Exception as exc:
                del self.trackers[name]
                log(
                    WARNING,
                    "tracking.%s failed and is off for the rest of the run (history.csv has "
                    "every round): %s: %s",
                    name,
                    type(exc).__name__,
                    exc,
                )
