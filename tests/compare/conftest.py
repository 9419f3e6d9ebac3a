"""One real 2 x 2 grid on tiny_bert (strategy x seed), run once through the CLI and shared."""

from __future__ import annotations

import pytest

from fedpeft.cli import main
from tests.conftest import FAST_RUN

#: FLoRA against zero-padded FedAvg with client ranks [2, 4], two seeds each
GRID = [
    *FAST_RUN,
    "strategy=fedavg,flora",
    "seed=0,1",
    "strategy.params.ranks=[2,4]",
    "adapter.rank=4",
]


@pytest.fixture(scope="session")
def grid_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("grid")
    assert main(["compare", *GRID, f"out_dir={out}", "jobs=2"]) == 0
    return out
