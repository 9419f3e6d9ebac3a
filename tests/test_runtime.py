"""The per-process model runtime."""

from __future__ import annotations

import torch

from fedpeft.config import compose_config
from fedpeft.federation import build_task
from fedpeft.runtime import model_runtime
from tests.conftest import FAST_RUN


def test_building_a_runtime_leaves_the_callers_rng_alone():
    """A cache miss (the first client a process serves) must draw no numbers from the global RNG,
    or that client's dropout masks would differ from a cache hit's."""
    task = build_task(compose_config([*FAST_RUN, "adapter.rank=3"]), 2)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    model_runtime(task)
    assert torch.equal(torch.get_rng_state(), before)
