"""Local table files (csv, tsv, json, jsonl, parquet): pandas readers and the `files` source."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from fedpeft.data.spec import DatasetSpec
from fedpeft.data.text_dataset import make_dataset
from fedpeft.errors import DataError

FILE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}


def read_frame(path: Path, fmt: str, hint: str, **kwargs: Any) -> pd.DataFrame:
    """Read one table file with pandas; a missing or unreadable file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path} not found: {hint}")
    try:
        if fmt in ("csv", "tsv"):
            kwargs.setdefault("keep_default_na", False)
            kwargs.setdefault("na_values", [""])
            return pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", **kwargs)
        if fmt in ("json", "jsonl"):
            return pd.read_json(path, lines=fmt == "jsonl", dtype=False, **kwargs)
        return pd.read_parquet(path, **kwargs)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as err:
        reason = " ".join(str(err).split())[:200]
        raise DataError(f"cannot read {path} as {fmt} ({reason}): {hint}") from err


def require_column(df: pd.DataFrame, column: str, path: Path, fix: str) -> pd.Series:
    if column not in df.columns:
        existing = ", ".join(map(str, df.columns))
        raise DataError(f"{path} has no column {column!r} (columns: {existing}): {fix}")
    return df[column]


def as_texts(series: pd.Series) -> list[str]:
    return series.fillna("").astype(str).tolist()


def encode_labels(columns: list[pd.Series], where: list[str]) -> tuple[list[list[int]], list[str]]:
    """Map label values (ints or strings) to ids 0..k-1 in sorted order, over all splits at once."""
    for series, name in zip(columns, where, strict=True):
        missing = int(series.isna().sum())
        if missing:
            raise DataError(f"{name} has {missing} row(s) with an empty label: fill or drop them")
    numeric = all(
        pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s) for s in columns
    )
    if numeric and all((s == s.round()).all() for s in columns):
        values = [s.astype("int64").tolist() for s in columns]
    else:
        values = [s.astype(str).tolist() for s in columns]
    classes = sorted(set().union(*values))
    index = {v: i for i, v in enumerate(classes)}
    return [[index[v] for v in vs] for vs in values], [str(v) for v in classes]


def _files_format(path: Path) -> str:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}: use one of "
            f"{', '.join(FILE_FORMATS)} (by extension)"
        )
    return fmt


def _find_split_file(root: Path, split: str) -> Path:
    for suffix in FILE_FORMATS:
        candidate = root / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    names = "/".join(s.lstrip(".") for s in FILE_FORMATS)
    raise DataError(
        f"dataset.path={root} has no {split}.{{{names}}} file: add one, or point dataset.path "
        "at a single file to split it by dataset.test_fraction"
    )


def read_files(spec: DatasetSpec) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    root = Path(spec.location)
    if not root.exists():
        raise DataError(
            f"dataset.path={root} does not exist: point it at a csv/tsv/json/jsonl/parquet file "
            "or a folder with train.<ext> and test.<ext>"
        )
    paths = (
        [_find_split_file(root, "train"), _find_split_file(root, "test")]
        if root.is_dir()
        else [root]
    )
    hint = "dataset.path must be a readable csv/tsv/json/jsonl/parquet file or folder of them"
    frames = [read_frame(p, _files_format(p), hint) for p in paths]
    texts = [
        as_texts(require_column(df, spec.text_column, p, "set dataset.text_column=<one of them>"))
        for df, p in zip(frames, paths, strict=True)
    ]
    labels = [
        require_column(df, spec.label_column, p, "set dataset.label_column=<one of them>")
        for df, p in zip(frames, paths, strict=True)
    ]
    ids, names = encode_labels(labels, [str(p) for p in paths])
    splits = [make_dataset(t, y, names) for t, y in zip(texts, ids, strict=True)]
    return splits[0], (splits[1] if len(splits) > 1 else None), names
