"""fedpeft.data.locations: the cache folder and the folders of local sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft import data
from fedpeft.errors import DataError
from tests.data.conftest import DATA_DIR, dataset_cfg


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


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("FEDPEFT_CACHE_DIR")
    assert data.cache_dir() == Path.home() / ".cache" / "fedpeft"
