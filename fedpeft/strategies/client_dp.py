"""Client-level DP on the server: clip each client's update, noise their sum, adapt the bound.

DP-FedAvg's server step (McMahan et al., 2018) for the methods whose aggregate is a sum of client
tensors followed by post-processing. A client's update is what it sends minus what the server
holds under the same keys (the tensors it started the round from), all its tensors flattened into
one vector and clipped to norm C as a whole. The noisy mean (sum_k clip(u_k) + N(0, (z C)^2 I)) /
(q N) divides by the expected cohort, not the count of replies, so one client moves it by at most
C / (q N) whoever replied; every client weighs the same, since a weight from a private example
count would make the sensitivity depend on private data. The method then folds `global + noisy
mean` in as its only reply: its SVD, rotation or refactorisation is post-processing.
With adaptive clipping the count of unclipped updates, shifted to sum (b_k - 1/2) (sensitivity
1/2), gets its own noise and steps C towards the target quantile (Andrew et al., 2021).

Flower's DifferentialPrivacyServerSideAdaptiveClipping does not fit (docs/privacy.md): it
weighs replies by their num-examples, clips each ArrayRecord separately, noises every global
array (frozen factors included), drops a round whose replies differ from a fixed cohort, draws from
numpy's global generator, and its geometric step uses the clipped fraction where Andrew et al.
use the unclipped one, which drives the bound away from the target quantile.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft import lowrank
from fedpeft.privacy.client_level import ClientDPSettings, ClientNoise, adaptive_clip_step


@dataclass(frozen=True)
class Release:
    """What one round's mechanism released: the bound it clipped to, the rounds spent so far.

    `unclipped_fraction` is the noisy estimate (adaptive clipping only; None otherwise).
    """

    clip_norm: float
    rounds: int
    unclipped_fraction: float | None
    noise: ClientNoise

    @property
    def epsilon(self) -> float:
        """The run's client-level epsilon after this round (accounted when asked)."""
        return self.noise.epsilon(self.rounds)


class ClientLevelDP:
    """The server's DP-FedAvg mechanism and its state across rounds (bound, rounds, generator)."""

    def __init__(self, settings: ClientDPSettings, noise: ClientNoise, seed: int) -> None:
        self.settings = settings
        self.noise = noise
        self.clip_norm = settings.clip_norm
        self.rounds = 0
        self.generator = torch.Generator()
        # Unseeded noise unless the run asks for reproducibility: whoever knows the seed can
        # subtract the noise.
        self.generator.manual_seed(seed if settings.reproducible else secrets.randbits(63))
        self.last: Release | None = None

    @property
    def adaptive(self) -> bool:
        """Whether the bound follows a quantile of the update norms."""
        return self.settings.clipping == "adaptive"

    def noisy_mean(
        self, updates: Sequence[Mapping[str, torch.Tensor]], shapes: Mapping[str, torch.Size]
    ) -> dict[str, torch.Tensor]:
        """(sum_k clip_C(u_k) + N(0, (z_update C)^2 I)) / (q N), as tensors of `shapes`.

        `updates` are the round's client updates under the keys of `shapes` (none: pure noise,
        still a round of the mechanism). Steps the bound when clipping is adaptive and records
        the round's release in `last`.
        """
        keys = list(shapes)
        size = sum(int(torch.Size(shapes[k]).numel()) for k in keys)
        rows = [torch.cat([u[k].reshape(-1).double() for k in keys]) for u in updates]
        stack = torch.stack(rows) if rows else torch.zeros(0, size, dtype=torch.float64)
        clipped, norms = lowrank.clip_rows(stack, self.clip_norm)
        unclipped = float((norms <= self.clip_norm).double().sum())
        return self.release_sum(clipped.sum(0), unclipped, len(rows), shapes)

    def release_sum(
        self,
        clipped_sum: torch.Tensor,
        unclipped: float,
        count: int,
        shapes: Mapping[str, torch.Size],
    ) -> dict[str, torch.Tensor]:
        """(clipped_sum + N(0, (z_update C)^2 I)) / (q N), as tensors of `shapes`.

        `clipped_sum` is the flat sum of the round's `count` updates, each clipped to the current
        bound (a zero vector when none replied), and `unclipped` how many of them were within it:
        noisy_mean computes both on the server, secure aggregation (fedpeft/secure_sum.py) gets
        them as one masked sum. Steps the bound when clipping is adaptive and records the round's
        release in `last`.
        """
        keys = list(shapes)
        size = sum(int(torch.Size(shapes[k]).numel()) for k in keys)
        if clipped_sum.numel() != size:
            raise ValueError(f"a clipped sum of {clipped_sum.numel()} entries for {size} entries")
        std = self.noise.update_multiplier * self.clip_norm
        noise = torch.normal(0.0, std, (size,), generator=self.generator, dtype=torch.float64)
        mean = (clipped_sum.double() + noise) / self.noise.expected_cohort
        used = self.clip_norm
        fraction = None
        if self.adaptive:
            shifted = unclipped - 0.5 * count
            count_noise = torch.normal(
                0.0, self.noise.count_stddev, (1,), generator=self.generator, dtype=torch.float64
            )
            fraction = (shifted + float(count_noise)) / self.noise.expected_cohort + 0.5
            self.clip_norm = adaptive_clip_step(
                used, fraction, self.settings.target_quantile, self.settings.clip_lr
            )
        self.rounds += 1
        self.last = Release(used, self.rounds, fraction, self.noise)
        out, offset = {}, 0
        for key in keys:
            n = int(torch.Size(shapes[key]).numel())
            out[key] = mean[offset : offset + n].view(shapes[key]).float()
            offset += n
        return out

    def epsilon(self) -> float:
        """Client-level epsilon spent by the rounds released so far."""
        return self.noise.epsilon(self.rounds)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The bound, the rounds spent and the generator, for a resumed server."""
        return {"client_dp.generator": self.generator.get_state()}, {
            "client_dp": {"clip_norm": self.clip_norm, "rounds": self.rounds}
        }

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what `state_dict` gave (a checkpoint without it is refused)."""
        saved = meta.get("client_dp")
        if not isinstance(saved, Mapping) or "client_dp.generator" not in tensors:
            raise ValueError(
                "the checkpoint has no client-level DP state: it was not written by a "
                "client_dp run, so its rounds cannot be accounted; start a new run"
            )
        self.clip_norm = float(saved["clip_norm"])
        self.rounds = int(saved["rounds"])
        self.generator.set_state(tensors["client_dp.generator"].to(torch.uint8))
