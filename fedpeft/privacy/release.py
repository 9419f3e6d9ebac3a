"""What a private client may release besides its DP-trained tensors: data-independent numbers only.

Every metric here is a function of the node's example count, its DP settings, the round's config
and the tensors' shapes, never of the examples themselves, so it costs no privacy budget:
- `num-examples` (n_k, which the node also declares when it joins), `steps` (local optimiser
  steps, fixed by the round's config), `bytes-down`, `bytes-up` (sizes of the exchanged tensors);
- `base-version`, `frozen-version` (which versioned state the node holds, set by the server);
- `adapter-rank` (the rank of the replied factors after self-pruning, which their shapes show
  anyway: a function of the DP-trained factors, so post-processing);
- `epsilon`, `delta`, `noise-multiplier`, `sample-rate`, `dp-steps` (the ledger: functions of n_k,
  the settings and the number of steps).
The training loss is not among them: it is the exact mean cross-entropy over the private
batches, with unbounded sensitivity, and the accountant never saw it.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedpeft.errors import FedPeftError
from fedpeft.protocol import (
    ADAPTER_RANK,
    BASE_VERSION,
    BYTES_DOWN,
    BYTES_UP,
    DP_STEPS,
    FROZEN_VERSION,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    SAMPLE_RATE,
)

PRIVATE_REPLY_METRICS = frozenset(
    {
        NUM_EXAMPLES,
        "steps",
        BYTES_DOWN,
        BYTES_UP,
        BASE_VERSION,
        FROZEN_VERSION,
        ADAPTER_RANK,
        "epsilon",
        "delta",
        NOISE_MULTIPLIER,
        SAMPLE_RATE,
        DP_STEPS,
    }
)


def private_reply_metrics(metrics: Mapping[str, float | int]) -> dict[str, float | int]:
    """The metrics of a private reply; anything outside PRIVATE_REPLY_METRICS is a bug: raise."""
    extra = sorted(set(metrics) - PRIVATE_REPLY_METRICS)
    if extra:
        raise FedPeftError(
            f"a private reply may not carry {', '.join(extra)}: only data-independent metrics "
            "leave a private node (fedpeft/privacy/release.py)"
        )
    return dict(metrics)
