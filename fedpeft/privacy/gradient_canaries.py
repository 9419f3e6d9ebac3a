"""Gradient canaries in a private client's DP-SGD: example-like gradients C * sign * e_j.

A gradient canary (data/canaries.py, kind "gradient") stands for an example whose clipped
gradient is exactly C along one coordinate of the trained tensors. The client treats each canary
it holds as one more example: it counts in n (so in q = batch / n and the ledger), each step
samples it with probability q like every other example, and a sampled canary adds sign * C at
its coordinate to the clipped sum before the noise is drawn. The auditor then reads how far the
final global model moved along each canary's coordinate. Only simulated clients take canary
tasks (task_guard refuses them on a deployed node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpeft.data.canaries import CanarySet


@dataclass(frozen=True)
class HeldCanaries:
    """The gradient canaries one client holds, placed on its live trainable tensors."""

    params: tuple[torch.Tensor, ...]
    tensor: torch.Tensor  # (k,) long: index into params
    flat: torch.Tensor  # (k,) long: flat position in that tensor
    sign: torch.Tensor  # (k,) float: +1 or -1

    @classmethod
    def place(
        cls, canaries: CanarySet, params: Sequence[torch.Tensor], partition_id: int, clients: int
    ) -> HeldCanaries:
        """Client `partition_id`'s canaries on `params`, the trained tensors in canary order."""
        tensor, flat, sign = canaries.coordinates([p.numel() for p in params])
        mine = canaries.held(partition_id, clients)
        return cls(
            tuple(params),
            torch.as_tensor(tensor[mine], dtype=torch.long),
            torch.as_tensor(flat[mine], dtype=torch.long),
            torch.as_tensor(sign[mine], dtype=torch.float64),
        )

    @property
    def count(self) -> int:
        """How many canaries this client holds (each counts as one example)."""
        return int(self.tensor.numel())

    def add_sampled(
        self, summed: Sequence[torch.Tensor], sample_rate: float, bound: float, rng: torch.Generator
    ) -> int:
        """Add sign * `bound` at each canary sampled this step to its clipped sum; how many.

        `summed` holds one clipped sum per entry of params (same shapes); each canary is sampled
        with probability `sample_rate`, independently, like a Poisson-sampled example.
        """
        if self.count == 0:
            return 0
        taken = torch.rand(self.count, generator=rng, dtype=torch.float64) < sample_rate
        for index, total in enumerate(summed):
            chosen = taken & (self.tensor == index)
            if bool(chosen.any()):
                values = (self.sign[chosen] * bound).to(total.dtype).to(total.device)
                total.view(-1).index_add_(0, self.flat[chosen].to(total.device), values)
        return int(taken.sum())


#: tensors smaller than this carry no canary: the auditor scales each coordinate's movement by its
#: tensor's spread, which a handful of elements (a head's bias) cannot estimate
MIN_TENSOR_SIZE = 256


def canary_keys(tensors: Mapping[str, torch.Tensor], trained: Sequence[str]) -> list[str]:
    """The trained tensors that carry gradient canaries, in canary order (client and auditor)."""
    return [k for k in trained if tensors[k].numel() >= MIN_TENSOR_SIZE]
