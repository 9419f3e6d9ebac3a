"""Audit canaries: synthetic examples whose presence in training an auditor tries to detect.

For a one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023) m canaries are drawn,
each is included in the training data with probability 1/2, independently, and, when included,
given to one client drawn uniformly. A classifier's canary is a sequence of random vocabulary
tokens with a random label: nothing in the real data predicts it, so a model that scores it
unusually well can only have learnt it from the canary itself. Everything is drawn from the
canary seed, so the server (the auditor) and each simulated client agree on the set without
exchanging it; the set is public by construction and holds nothing of anyone's data.

Canaries come in two kinds. `input` canaries are the examples above: they test the whole path
from data to model, but a short private run barely memorises random-token examples, so their
scores separate weakly. `gradient` canaries (the paper's white-box "Dirac" canaries) are examples
whose clipped gradient is C * sign * e_j, one coordinate j of the trained tensors: a private
client adds each one it holds to its clipped sum, sampled like an example, before the noise
(privacy/gradient_canaries.py), and the auditor reads coordinate j of the final model. They test
the mechanism the ledger accounts for (sampling, clipping, noise, steps, the divisor) at its
strongest, which is what a bug in the glue breaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the largest canary set (more gives little: the bound's tightness saturates with m)
MAX_CANARIES = 100_000
#: canary kinds: examples in the data, or example-like gradients in the clipped sum
KINDS = ("input", "gradient")


@dataclass(frozen=True)
class CanarySet:
    """m canaries (random-token examples or gradient coordinates), each in w.p. 1/2, one owner."""

    count: int
    seed: int
    length: int = 16
    kind: str = "input"

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_CANARIES:
            raise ValueError(f"canaries={self.count} must be in [1, {MAX_CANARIES}]")
        if not 1 <= self.length <= 512:
            raise ValueError(f"canary length={self.length} must be in [1, 512]")
        if self.kind not in KINDS:
            raise ValueError(f"canary kind={self.kind!r} is unknown: choose one of {KINDS}")

    def _rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream])

    def included(self) -> np.ndarray:
        """(m,) bool: which canaries are in the training data (each w.p. 1/2)."""
        return self._rng(0).random(self.count) < 0.5

    def owners(self, num_clients: int) -> np.ndarray:
        """(m,) int: the client (partition id) holding each canary when it is included."""
        return self._rng(1).integers(0, num_clients, self.count)

    def examples(self, tokenizer: Any, num_labels: int) -> list[dict]:
        """All m canaries, encoded as the classification task's examples (ids, mask, label)."""
        special = set(tokenizer.all_special_ids)
        vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
        rng = self._rng(2)
        tokens = vocab[rng.integers(0, len(vocab), (self.count, self.length))]
        labels = rng.integers(0, num_labels, self.count)
        out = []
        for ids, label in zip(tokens.tolist(), labels.tolist(), strict=True):
            full = _framed(tokenizer, ids)
            out.append({"input_ids": full, "attention_mask": [1] * len(full), "label": label})
        return out

    def held(self, partition_id: int, num_clients: int) -> np.ndarray:
        """(k,) int: the indices of the included canaries this client holds, ascending."""
        return np.flatnonzero(self.included() & (self.owners(num_clients) == partition_id))

    def for_client(
        self, partition_id: int, num_clients: int, tokenizer: Any, num_labels: int
    ) -> list[dict]:
        """The included input canaries this client holds (none for gradient canaries)."""
        if self.kind != "input":
            return []
        examples = self.examples(tokenizer, num_labels)
        return [examples[i] for i in self.held(partition_id, num_clients)]

    def coordinates(self, sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gradient canaries' places: (tensor, flat, sign), each (m,).

        Canary i sits at flat position flat[i] of tensor tensor[i] (an index into `sizes`, the
        trained tensors' element counts in a fixed order) and points along sign[i] in {-1, +1};
        no two canaries share a coordinate.
        """
        total = int(sum(sizes))
        if self.count > total:
            raise ValueError(
                f"{self.count} gradient canaries need as many trained coordinates; the adapter "
                f"has {total}: use fewer canaries"
            )
        rng = self._rng(3)
        position = rng.choice(total, self.count, replace=False)
        sign = rng.choice(np.array([-1.0, 1.0]), self.count)
        offsets = np.cumsum([0, *sizes])
        tensor = np.searchsorted(offsets, position, side="right") - 1
        return tensor, position - offsets[tensor], sign

    def to_dict(self) -> dict[str, Any]:
        """The task's JSON `canaries` section."""
        return {"count": self.count, "seed": self.seed, "length": self.length, "kind": self.kind}


def _framed(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` between the special tokens the tokenizer puts around a text ([CLS] .. [SEP], BOS)."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.cls_token_id is not None else None
    return [t for t in (start, *ids, end) if t is not None]
