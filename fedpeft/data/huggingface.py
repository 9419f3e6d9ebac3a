"""The `hf` source: a dataset loaded with `datasets.load_dataset` (hub id or local folder)."""

from __future__ import annotations

import datasets
import pandas as pd

from fedpeft.data.spec import DatasetSpec
from fedpeft.data.table_files import encode_labels
from fedpeft.data.text_dataset import make_dataset
from fedpeft.errors import DataError


def read_hf(spec: DatasetSpec) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    try:
        loaded = datasets.load_dataset(spec.location, spec.subset)
    except Exception as err:  # the hub client raises many types; all mean "could not load it"
        reason = " ".join(str(err).split())[:200]
        raise DataError(
            f"could not load dataset.path={spec.location!r} (subset {spec.subset!r}) with datasets "
            f"({type(err).__name__}: {reason}); if the Hugging Face hub cannot be reached from "
            "here, save a local copy and use dataset=files dataset.path=/path/to/copy"
        ) from err
    available = ", ".join(loaded.keys())
    if spec.train_split not in loaded:
        raise DataError(
            f"{spec.location} has no split {spec.train_split!r} (splits: {available}): "
            "set dataset.train_split=<one of them>"
        )
    parts = [loaded[spec.train_split]]
    if spec.test_split is not None and spec.test_split in loaded:
        parts.append(loaded[spec.test_split])
    elif spec.test_fraction is None:
        raise DataError(
            f"{spec.location} has no split {spec.test_split!r} (splits: {available}): set "
            "dataset.test_split=<one of them> or dataset.test_fraction=0.2 to split the train split"
        )
    for part in parts:
        for column, field in (
            (spec.text_column, "text_column"),
            (spec.label_column, "label_column"),
        ):
            if column not in part.column_names:
                raise DataError(
                    f"{spec.location} split {part.split} has no column {column!r} (columns: "
                    f"{', '.join(part.column_names)}): set dataset.{field}=<one of them>"
                )
    feature = parts[0].features[spec.label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        ids = [part[spec.label_column][:] for part in parts]
        for part, values in zip(parts, ids, strict=True):
            if any(v < 0 or v >= len(names) for v in values):
                raise DataError(
                    f"{spec.location} split {part.split} has unlabelled rows (label -1): "
                    "set dataset.test_split to a labelled split or use dataset.test_fraction"
                )
    else:
        series = [pd.Series(part[spec.label_column][:]) for part in parts]
        ids, names = encode_labels(series, [f"{spec.location} split {p.split}" for p in parts])
    splits = [
        make_dataset(part[spec.text_column][:], y, names)
        for part, y in zip(parts, ids, strict=True)
    ]
    return splits[0], (splits[1] if len(splits) > 1 else None), names
