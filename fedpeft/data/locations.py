"""Where data lives: the cache folder for fetched corpora and the folders of local sources."""

from __future__ import annotations

import os
from pathlib import Path

from fedpeft.errors import DataError


def cache_dir() -> Path:
    """Where fetched corpora and parsed caches live: $FEDPEFT_CACHE_DIR or ~/.cache/fedpeft."""
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
