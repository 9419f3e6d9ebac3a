"""Shared fixtures and helpers for the fedpeft.data tests: real data sets from shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from fedpeft import data

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "fedpeft" / "configs"
DATA_DIR = Path(
    os.environ.get("FEDPEFT_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data"
)


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDPEFT_DATA_DIR", str(DATA_DIR))
    return DATA_DIR


def dataset_cfg(name: str, **overrides: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "dataset" / f"{name}.yaml"))
    cfg.update(overrides)
    return cfg


def partition_cfg(name: str, **overrides: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "partition" / f"{name}.yaml"))
    cfg.update(overrides)
    return cfg


def check_contract(ds: datasets.Dataset, num_labels: int) -> None:
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].dtype == "int64"
    labels = np.asarray(ds["label"][:])
    assert labels.min() >= 0 and labels.max() < num_labels
    assert all(isinstance(t, str) and t.strip() for t in ds["text"][:])


def sample_frame(rows: int = 40) -> pd.DataFrame:
    labels = ["spam", "ham", "eggs", "ham"]
    return pd.DataFrame(
        {
            "review": [f'example number {i}, with a comma and "quotes"' for i in range(rows)],
            "stars": [labels[i % 4] for i in range(rows)],
        }
    )


def write_frame(df: pd.DataFrame, path: Path) -> None:
    fmt = path.suffix
    if fmt == ".csv":
        df.to_csv(path, index=False)
    elif fmt == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == ".json":
        df.to_json(path, orient="records")
    elif fmt == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)


PARTITIONS = {
    "iid": partition_cfg("iid"),
    "dirichlet": partition_cfg("dirichlet", alpha=0.3),
    "pathological": partition_cfg("pathological"),
}


@pytest.fixture(scope="module")
def trec_train() -> datasets.Dataset:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPEFT_DATA_DIR", str(DATA_DIR))
        train = data.load_text_dataset(dataset_cfg("trec")).train
    return train.add_column("idx", list(range(len(train))))
