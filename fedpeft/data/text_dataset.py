"""`TextDataset`, the one shape every source yields, and the builder of its splits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import datasets


@dataclass(frozen=True)
class TextDataset:
    """A labelled text-classification corpus: client-side train split and server-side test split."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        """Number of classes; labels are ints in [0, num_labels)."""
        return len(self.label_names)


def make_dataset(texts: Iterable[Any], labels: Iterable[int], names: list[str]) -> datasets.Dataset:
    """Build a dataset with the contract's columns, dropping rows whose text is empty."""
    rows = [(str(t).strip(), int(y)) for t, y in zip(texts, labels, strict=True)]
    rows = [(t, y) for t, y in rows if t]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict(
        {"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features=features
    )
