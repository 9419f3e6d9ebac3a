"""A SuperNode's own settings from its node config: the device and dtype it trains in.

The server's task names one device and dtype for everyone; an edge device may differ (a CPU-only
box, a GPU that prefers bfloat16), so `device=` and `dtype=` in the node config override them for
this node. Replies stay float32 whatever the node computes in (`adapters.read_adapter` casts), so
the server's validation and byte accounting do not depend on the node.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fedpeft import models
from fedpeft.errors import ConfigError

DEVICE_KEY, DTYPE_KEY = "device", "dtype"


def node_task(task: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The task with this node's `device` and `dtype` (node config) in place of the server's."""
    out = copy.deepcopy(dict(task))
    if DEVICE_KEY in node_config:
        out["device"] = str(node_config[DEVICE_KEY])
    if DTYPE_KEY in node_config:
        dtype = str(node_config[DTYPE_KEY])
        if dtype not in models.DTYPES:
            raise ConfigError(
                f"node config dtype={dtype!r} is unknown: choose one of {', '.join(models.DTYPES)}"
            )
        out["model"] = {**out["model"], "dtype": dtype}
    device = models.resolve_device(out.get("device"))
    if device.type == "cpu" and out["model"].get("dtype") == "float16":
        raise ConfigError(
            "dtype=float16 is not supported for training on a CPU: set node config "
            'dtype="bfloat16" or dtype="float32" on this node (or device="cuda" with a GPU)'
        )
    return out
