"""What one round moved and who took part: the strategy's per-round record for the history."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeft.strategies.client_dp import Release


@dataclass
class RoundStats:
    """What one round moved and who took part, for the history."""

    sampled: int = 0
    replied: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    rejected: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    client_loss: dict[int, float] = field(default_factory=dict)
    client_epsilon: dict[int, float] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)
    train_loss: float | None = None
    aggregate_s: float = 0.0
    #: ||Delta|| of the averaged tensors against the global the clients started from, and the
    #: expected norm of the DP noise in it (update_noise.py); None when not measured
    update_norm: float | None = None
    dp_noise_norm: float | None = None
    #: CPU seconds of local training summed over the accepted replies that report it (private
    #: replies do not); None when none did
    client_seconds: float | None = None
    #: what client-level DP released this round (bound, epsilon so far); None when off
    client_dp: Release | None = None
