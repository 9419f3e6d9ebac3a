"""Shared fixtures: real data from ../shared/data, the tiny model, and fake replies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("FEDPEFT_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# No model hub on our machines: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    "name": "tiny_bert",
    "name_or_path": None,
    "revision": None,
    "dtype": "float32",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 128,
}

#: Overrides for a fast real federation: tiny_bert on a slice of SST-2.
FAST_RUN = [
    "model=tiny_bert",
    "dataset=sst2",
    "dataset.max_train_examples=400",
    "dataset.max_test_examples=200",
    "federation.num_clients=2",
    "federation.rounds=2",
    "federation.local_steps=3",
    "partition=iid",
    "train.max_length=32",
]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["FEDPEFT_DATA_DIR"])
    if not (path / "sst2" / "train.tsv").is_file():
        pytest.fail(f"FEDPEFT_DATA_DIR={path} does not hold the shared data sets (sst2/train.tsv)")
    return path
