"""Audit canaries: synthetic examples whose presence in training an auditor tries to detect.

For a one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023) m canaries are drawn,
each is included in the training data with probability 1/2, independently, and, when included,
given to one client drawn uniformly. A classifier's canary is a sequence of random vocabulary
tokens with a random label: nothing in the real data predicts it, so a model that scores it
unusually well can only have learnt it from the canary itself. Everything is drawn from the
canary seed, so the server (the auditor) and each simulated client agree on the set without
exchanging it; the set is public by construction and holds nothing of anyone's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: the largest canary set (more gives little: the bound's tightness saturates with m)
MAX_CANARIES = 100_000


@dataclass(frozen=True)
class CanarySet:
    """m canaries of `length` random tokens, each included w.p. 1/2 and owned by one client."""

    count: int
    seed: int
    length: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_CANARIES:
            raise ValueError(f"canaries={self.count} must be in [1, {MAX_CANARIES}]")
        if not 1 <= self.length <= 512:
            raise ValueError(f"canary length={self.length} must be in [1, 512]")

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

    def for_client(
        self, partition_id: int, num_clients: int, tokenizer: Any, num_labels: int
    ) -> list[dict]:
        """The included canaries this client holds."""
        mine = self.included() & (self.owners(num_clients) == partition_id)
        examples = self.examples(tokenizer, num_labels)
        return [examples[i] for i in np.flatnonzero(mine)]

    def to_dict(self) -> dict[str, int]:
        """The task's JSON `canaries` section."""
        return {"count": self.count, "seed": self.seed, "length": self.length}


def _framed(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` between the special tokens the tokenizer puts around a text ([CLS] .. [SEP], BOS)."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.cls_token_id is not None else None
    return [t for t in (start, *ids, end) if t is not None]
