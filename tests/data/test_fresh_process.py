"""A new interpreter, as a Flower client process: same partitions, and the `hf` source loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest

from fedpeft import data
from tests.data.conftest import DATA_DIR, PARTITIONS, REPO, sample_frame, write_frame

FRESH_SCRIPT = """
import json, sys
from fedpeft import data
from fedpeft.errors import DataError
cfgs = json.loads(sys.argv[1])
train = data.load_text_dataset({"name": "trec", "path": None}).train
train = train.add_column("idx", list(range(len(train))))
parts = {k: data.partition_dataset(train, 6, 4, c, seed=5)["idx"][:] for k, c in cfgs.items()}
out = {"partitions": parts}
hf = {"name": "hf", "subset": None, "train_split": "train", "test_split": "test",
      "text_column": "review", "label_column": "stars", "test_fraction": None}
local = data.load_text_dataset({**hf, "path": "local"})
out["hf_sizes"], out["hf_names"] = [len(local.train), len(local.test)], local.label_names
try:
    data.load_text_dataset({**hf, "path": "fedpeft-no-such-user/no-such-dataset"})
except DataError as err:
    out["hf_error"] = str(err)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Partitions and hf loads computed by a new interpreter, as a Flower client process would."""
    cwd = tmp_path_factory.mktemp("fresh")
    (cwd / "local").mkdir()
    write_frame(sample_frame(40), cwd / "local" / "train.csv")
    write_frame(sample_frame(12), cwd / "local" / "test.csv")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "FEDPEFT_DATA_DIR": str(DATA_DIR),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cwd / "hf"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_SCRIPT, json.dumps(PARTITIONS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_partitions_agree_across_processes(
    trec_train: datasets.Dataset, fresh_process: dict
) -> None:
    for name, cfg in PARTITIONS.items():
        mine = data.partition_dataset(trec_train, 6, 4, cfg, seed=5)["idx"][:]
        assert fresh_process["partitions"][name] == mine, name


def test_hf_source_local_folder_and_offline_error(fresh_process: dict) -> None:
    assert fresh_process["hf_sizes"] == [40, 12]
    assert fresh_process["hf_names"] == ["eggs", "ham", "spam"]
    error = fresh_process["hf_error"]
    assert "fedpeft-no-such-user/no-such-dataset" in error and "dataset=files" in error
