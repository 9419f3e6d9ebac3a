"""fedpeft.data.corpora on the shared/data copies of SST-2, BANKING77 and TREC."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedpeft import data
from fedpeft.errors import DataError
from tests.data.conftest import CONFIGS, DATA_DIR, check_contract, dataset_cfg


def test_sst2_rows_and_labels() -> None:
    sst2 = data.load_text_dataset(OmegaConf.load(CONFIGS / "dataset" / "sst2.yaml"))
    assert (len(sst2.train), len(sst2.test)) == (67_349, 872)
    assert sst2.label_names == ["negative", "positive"]
    assert Counter(sst2.train["label"][:]) == {1: 37_569, 0: 29_780}
    assert Counter(sst2.test["label"]) == {1: 444, 0: 428}
    check_contract(sst2.train, 2)
    check_contract(sst2.test, 2)


def test_banking77_rows_and_labels() -> None:
    bank = data.load_text_dataset(dataset_cfg("banking77"))
    assert (len(bank.train), len(bank.test)) == (10_003, 3_080)
    assert bank.num_labels == 77
    categories = json.loads((DATA_DIR / "banking77" / "categories.json").read_text())
    assert bank.label_names == categories
    assert set(bank.train["label"]) == set(range(77))
    check_contract(bank.train, 77)
    check_contract(bank.test, 77)


def test_trec_rows_and_coarse_labels() -> None:
    trec = data.load_text_dataset(dataset_cfg("trec"))
    assert (len(trec.train), len(trec.test)) == (5_452, 500)
    assert trec.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert set(trec.test["label"]) == set(range(6))
    first = (DATA_DIR / "trec" / "train_5500.label").read_text(encoding="latin-1").splitlines()[0]
    assert first.startswith("DESC:manner ")
    assert trec.train[0] == {"text": first.split(" ", 1)[1].strip(), "label": 1}
    check_contract(trec.train, 6)


def test_wrong_folder_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    with pytest.raises(DataError, match=r"dev\.tsv not found"):
        data.load_text_dataset(dataset_cfg("sst2", path=str(tmp_path)))
