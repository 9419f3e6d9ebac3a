"""fedpeft.data.table_files: the `files` source over csv, tsv, json, jsonl and parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedpeft import data
from fedpeft.errors import DataError
from tests.data.conftest import check_contract, dataset_cfg, sample_frame, write_frame


@pytest.mark.parametrize("ext", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_files_single_file_with_string_labels(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"reviews.{ext}"
    write_frame(sample_frame(), path)
    cfg = dataset_cfg("files", path=str(path), text_column="review", label_column="stars")
    ds = data.load_text_dataset(cfg, seed=3)
    assert ds.label_names == ["eggs", "ham", "spam"]
    assert (len(ds.train), len(ds.test)) == (32, 8)
    assert set(ds.test["label"]) == {0, 1, 2}, "the split is stratified"
    assert set(ds.train["text"]).isdisjoint(ds.test["text"])
    check_contract(ds.train, 3)


def test_files_directory_with_int_labels_and_empty_text(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["good", "bad", "", "fine"], "label": [1, 0, 1, 2]}).to_csv(
        tmp_path / "train.csv", index=False
    )
    pd.DataFrame({"text": ["great", "awful"], "label": [1, 0]}).to_json(
        tmp_path / "test.jsonl", orient="records", lines=True
    )
    ds = data.load_text_dataset(dataset_cfg("files", path=str(tmp_path)))
    assert ds.label_names == ["0", "1", "2"]
    assert ds.train["text"] == ["good", "bad", "fine"]
    assert ds.train["label"] == [1, 0, 2]
    assert ds.test["label"] == [1, 0]


def test_files_errors(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    write_frame(sample_frame(), path)
    with pytest.raises(DataError) as err:
        data.load_text_dataset(dataset_cfg("files", path=str(path), label_column="stars"))
    message = str(err.value)
    assert "'text'" in message and str(path) in message and "review, stars" in message
    assert "dataset.text_column=" in message
    with pytest.raises(DataError, match="dataset.label_column="):
        data.load_text_dataset(dataset_cfg("files", path=str(path), text_column="review"))
    with pytest.raises(DataError, match="missing.csv"):
        data.load_text_dataset(dataset_cfg("files", path=str(tmp_path / "missing.csv")))
    (tmp_path / "notes.txt").write_text("text,label\n")
    with pytest.raises(DataError, match="unsupported file type"):
        data.load_text_dataset(dataset_cfg("files", path=str(tmp_path / "notes.txt")))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read .*broken.parquet"):
        data.load_text_dataset(dataset_cfg("files", path=str(tmp_path / "broken.parquet")))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_frame(sample_frame(), folder / "train.csv")
    with pytest.raises(DataError, match=r"no test\."):
        data.load_text_dataset(dataset_cfg("files", path=str(folder)))
