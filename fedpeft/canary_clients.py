"""Canary clients for a simulated audit at client level (Andrew et al., ICLR 2024).

k canary clients join a simulated federation. Each round each is sampled with the run's
participation rate; a sampled canary replies with the global adapter moved along its own fixed
random unit direction u_j (over the tensors clients upload), by the round's median real update
norm, and with the median real weight: the size of a typical client, since fedpeft has no
client-level clipping bound to scale to. At the end the cosine between each u_j and the final
global adapter's movement theta_T - theta_0 is compared with the cosines of k fresh directions
that never entered (privacy/one_shot_estimate.py). What hides a canary client is only the other
clients' updates and the example-level DP noise in them: the estimate shows what example-level
DP gives at client level. fedpeft accounts no client-level DP, and this is an estimate, not a
bound.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpeft import lowrank
from fedpeft.errors import ConfigError

Tensors = dict[str, torch.Tensor]


@dataclass
class CanaryClients:
    """k canary clients over the uploaded tensors, each sampled every round at `rate`."""

    count: int
    seed: int
    rate: float
    #: rounds each canary took part in, filled as the run goes
    rounds_in: np.ndarray = field(init=False)
    #: the uploaded tensors' shapes, the space of the directions (set by the first round)
    shapes: dict[str, torch.Size] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not 2 <= self.count <= 10_000:
            raise ConfigError(f"canary_clients={self.count} must be in [2, 10000], e.g. 200")
        if not 0 < self.rate <= 1:
            raise ConfigError(f"canary clients' rate={self.rate} must be in (0, 1]")
        self.rounds_in = np.zeros(self.count, dtype=np.int64)

    def direction(self, j: int, shapes: Mapping[str, torch.Size]) -> Tensors:
        """Canary j's unit direction (j >= count: a null canary that never enters), float64."""
        generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + j)
        parts = {
            k: torch.randn(shape, generator=generator, dtype=torch.float64)
            for k, shape in sorted(shapes.items())
        }
        total = torch.sqrt(sum(p.square().sum() for p in parts.values()))
        return {k: p / total for k, p in parts.items()}

    def join(
        self,
        server_round: int,
        global_adapter: Mapping[str, torch.Tensor],
        updates: Sequence[Tensors],
        weights: Sequence[float],
    ) -> tuple[list[Tensors], torch.Tensor]:
        """The round's updates with the sampled canaries' added, and the normalised weights."""
        if not updates:
            return list(updates), lowrank.normalize_weights(list(weights))
        shapes = self.shapes or {k: v.shape for k, v in updates[0].items()}
        self.shapes = shapes
        odd = [
            k for k, s in shapes.items() if k not in global_adapter or global_adapter[k].shape != s
        ]
        if odd:
            raise ConfigError(
                f"canary clients reply in the global adapter's shapes, and this method's replies "
                f"differ ({odd[0]}): audit it without canary_clients"
            )
        norms = [
            float(torch.sqrt(sum((u[k].double() - global_adapter[k].double()).square().sum()
                                 for k in shapes)))
            for u in updates
        ]  # fmt: skip
        size, weight = statistics.median(norms), statistics.median(weights)
        rng = np.random.default_rng([self.seed, server_round])
        sampled = np.flatnonzero(rng.random(self.count) < self.rate)
        self.rounds_in[sampled] += 1
        joined = list(updates)
        for j in sampled.tolist():
            u = self.direction(int(j), shapes)
            joined.append(
                {
                    k: (global_adapter[k].double() + size * u[k]).to(global_adapter[k].dtype)
                    for k in shapes
                }
            )
        return joined, lowrank.normalize_weights([*weights, *[weight] * len(sampled)])

    def cosines(
        self, initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inserted, null): the movement's cosines with the canaries that took part and fresh ones.

        The movement is the final global adapter's minus the initial one's, over the uploaded
        tensors; the null set is `count` directions that never entered.
        """
        keys = list(self.shapes)
        moved = {k: final[k].double() - initial[k].double() for k in keys}
        length = float(torch.sqrt(sum(m.square().sum() for m in moved.values())))

        def cosine(j: int) -> float:
            u = self.direction(j, self.shapes)
            return float(sum((u[k] * moved[k]).sum() for k in keys)) / max(length, 1e-300)

        inserted = [cosine(j) for j in np.flatnonzero(self.rounds_in > 0).tolist()]
        null = [cosine(self.count + j) for j in range(self.count)]
        return np.array(inserted), np.array(null)
