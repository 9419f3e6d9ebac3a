"""`load_text_dataset`: each source's reader, then seeded test and validation splits, subsets."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import datasets

from fedpeft.data.corpora import read_banking77, read_sst2, read_trec
from fedpeft.data.huggingface import read_hf
from fedpeft.data.prompt_pairs import read_gsm8k, read_jsonl, split
from fedpeft.data.spamassassin import read_spamassassin
from fedpeft.data.spec import DatasetSpec, parse_spec
from fedpeft.data.table_files import read_files
from fedpeft.data.text_dataset import TextDataset
from fedpeft.errors import ConfigError, DataError

_READERS = {
    "spamassassin": read_spamassassin,
    "sst2": read_sst2,
    "banking77": read_banking77,
    "trec": read_trec,
    "files": read_files,
    "hf": read_hf,
    "gsm8k": read_gsm8k,
    "jsonl": read_jsonl,
}


def load_text_dataset(cfg: Mapping, seed: int = 0) -> TextDataset:
    """Load the source named by the `dataset` config group as train/test splits with int labels.

    With `dataset.validation_fraction` set, that fraction of the training split is carved off
    (seeded, stratified by label) and returned as the held-out split in place of the test split,
    which is then never read: how `fedpeft compare tune=` scores its trials.
    Results are cached per process, so every client of a simulation reads and parses a source once.
    """
    return _load(parse_spec(cfg, seed))


@functools.lru_cache(maxsize=8)
def _load(spec: DatasetSpec) -> TextDataset:
    train, test, names = _READERS[spec.name](spec)
    if test is None:
        if spec.test_fraction is None:
            raise ConfigError(
                f"dataset.test_fraction is null but dataset={spec.name} has no test split here: "
                "set dataset.test_fraction=0.2 (or another fraction in (0, 1))"
            )
        train, test = _split(train, spec.test_fraction, spec.seed, "test_fraction")
    if spec.validation_fraction is not None:
        train, test = _split(train, spec.validation_fraction, spec.seed, "validation_fraction")
    train = _subsample(train, spec.max_train_examples, spec.seed)
    test = _subsample(test, spec.max_test_examples, spec.seed)
    return TextDataset(train=train, test=test, label_names=list(names))


def _split(
    ds: datasets.Dataset, fraction: float, seed: int, field: str
) -> tuple[datasets.Dataset, ...]:
    """Seeded split by `dataset.<field>`, stratified by label unless a class is too small for it.

    Prompt/response pairs have no label and split plainly.
    """
    if "label" not in ds.column_names:
        return split(ds, fraction, seed)
    if len(ds) < 2:
        raise DataError(
            f"only {len(ds)} labelled example(s) with text: too few to split off a test set"
        )
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError:
        try:
            parts = ds.train_test_split(test_size=fraction, seed=seed)
        except ValueError as err:
            reason = " ".join(str(err).split())[:200]
            raise ConfigError(
                f"dataset.{field}={fraction} cannot split {len(ds)} examples ({reason}): "
                "pick a fraction that leaves examples on both sides"
            ) from err
    return parts["train"], parts["test"]


def _subsample(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))
