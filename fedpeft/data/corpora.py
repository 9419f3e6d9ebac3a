"""Readers of the named corpora kept under $FEDPEFT_DATA_DIR: SST-2, BANKING77 and TREC."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets

from fedpeft.data.spec import DatasetSpec
from fedpeft.data.table_files import as_texts, read_frame, require_column
from fedpeft.data.text_dataset import make_dataset
from fedpeft.errors import DataError

TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def read_sst2(spec: DatasetSpec) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    root = Path(spec.location)
    hint = f"dataset.path={root} must hold SST-2's train.tsv and dev.tsv (columns sentence, label)"
    names = ["negative", "positive"]
    splits = []
    for file in ("train.tsv", "dev.tsv"):
        df = read_frame(root / file, "tsv", hint, quoting=csv.QUOTE_NONE)
        label = require_column(df, "label", root / file, hint)
        if label.isna().any() or not set(label.unique()) <= {0, 1}:
            raise DataError(f"{root / file}: labels must be 0 or 1: {hint}")
        splits.append(
            make_dataset(as_texts(require_column(df, "sentence", root / file, hint)), label, names)
        )
    return splits[0], splits[1], names


def read_banking77(spec: DatasetSpec) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    root = Path(spec.location)
    hint = f"dataset.path={root} must hold BANKING77's train.csv, test.csv and categories.json"
    categories = root / "categories.json"
    try:
        names = json.loads(categories.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {categories} ({type(err).__name__}): {hint}") from err
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{categories} must be a JSON list of category names: {hint}")
    index = {n: i for i, n in enumerate(names)}
    splits = []
    for file in ("train.csv", "test.csv"):
        df = read_frame(root / file, "csv", hint)
        category = as_texts(require_column(df, "category", root / file, hint))
        unknown = sorted(set(category) - index.keys())
        if unknown:
            raise DataError(f"{root / file}: categories {unknown[:3]} are not in {categories}")
        text = as_texts(require_column(df, "text", root / file, hint))
        splits.append(make_dataset(text, [index[c] for c in category], names))
    return splits[0], splits[1], names


def read_trec(spec: DatasetSpec) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    root = Path(spec.location)
    hint = f"dataset.path={root} must hold TREC's train_5500.label and TREC_10.label"
    index = {n: i for i, n in enumerate(TREC_LABELS)}
    splits = []
    for file in ("train_5500.label", "TREC_10.label"):
        path = root / file
        try:
            lines = path.read_text(encoding="latin-1").splitlines()
        except OSError as err:
            raise DataError(f"cannot read {path} ({type(err).__name__}): {hint}") from err
        texts, labels = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            tag, _, question = line.partition(" ")
            coarse = tag.split(":", 1)[0]
            if coarse not in index:
                raise DataError(
                    f"{path}:{number}: expected 'COARSE:fine question', got {line[:40]!r}"
                )
            texts.append(question)
            labels.append(index[coarse])
        splits.append(make_dataset(texts, labels, TREC_LABELS))
    return splits[0], splits[1], TREC_LABELS
