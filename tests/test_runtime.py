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


def test_kinds_with_the_same_modules_share_one_model_frozen_per_task():
    """lora, frozen_a and frozen_b switch on one model (RoLoRA changes kind every round)."""
    task = build_task(compose_config([*FAST_RUN, "adapter.rank=3"]), 2)
    runtimes = {}
    for kind, trained in (("frozen_b", "lora_A"), ("frozen_a", "lora_B"), ("lora", "lora_")):
        runtimes[kind] = model_runtime({**task, "adapter": {**task["adapter"], "kind": kind}})
        names = [n for n, p in runtimes[kind].model.named_parameters() if p.requires_grad]
        assert names and all(trained in n or "modules_to_save" in n for n in names), kind
    assert runtimes["frozen_a"] is runtimes["frozen_b"] is runtimes["lora"]
