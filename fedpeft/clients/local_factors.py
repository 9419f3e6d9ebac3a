"""Factors a node keeps to itself across rounds and restarts, and its held-out evaluation slice.

Driven by two round-config entries, never by a method's name:

- `local-factors`: comma-separated factor names (`lora_A`, `lora_B`, `lora_R`) and/or `head`.
  The node trains them, never sends them, and starts every round from its own last values of
  them (the initial adapter's before its first round). They live in the node's Flower
  `Context.state` (per node in simulation and deployment) and in a file in the node's state
  directory (node config `state-dir`, the one its privacy ledgers use):
  `run-<run id>/client-<name>.local-factors.safetensors`, replaced atomically after every round
  (durable_files.write_atomically). A SuperNode keeps `Context.state` in memory only, so
  after a restart the file brings its factors back; without the file (a new machine, a deleted
  directory) the node starts again from the initial adapter and logs it.
- `holdout-fraction` = f: the node holds round(f n) of its n examples (at least 1, and at least
  1 left to train on) out of training and scores its personal model on them. The slice is the
  first of a permutation seeded by the run's seed and the node's name, so it is the same in
  every round, process and restart; the rest, in their original order, is what it trains on
  (and its num-examples, the aggregation weight).

Personalised metrics are computed on the node's own data and no DP accountant sees them, so a
node refuses to release them whenever the round or its policy is private (`check_release`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from flwr.app import RecordDict
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedpeft import adapters
from fedpeft.adapters import HEAD_PREFIX
from fedpeft.clients.round_feature import Round, RoundFeature
from fedpeft.durable_files import write_atomically
from fedpeft.errors import FedPeftError
from fedpeft.privacy.policy import NodePolicy, PolicyViolation
from fedpeft.privacy.settings import DPSettings
from fedpeft.protocol import HOLDOUT_FRACTION, LOCAL_FACTORS
from fedpeft.records import from_record, to_record

logger = logging.getLogger(__name__)

FORMAT = "fedpeft-local-factors/1"
STATE_KEY = "fedpeft.local-factors"
T = TypeVar("T")


class LocalStateCorrupt(FedPeftError):
    """The node's local-factor file exists but cannot be read: refuse rather than start over."""


def local_names(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The factor names (and `head`) the round's config keeps on this node (empty: none)."""
    raw = str(config.get(LOCAL_FACTORS, "")).strip()
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def is_local(key: str, names: Iterable[str]) -> bool:
    """Whether a canonical adapter key belongs to one of the named local factors."""
    names = set(names)
    if key.startswith(HEAD_PREFIX):
        return "head" in names
    return key.rsplit(".", 1)[-1] in names


class LocalFactorFile:
    """One node's local factors for one run, on disk (safetensors, written atomically)."""

    def __init__(self, state_dir: str | Path, run_id: int, member: int) -> None:
        self.run_id, self.member = int(run_id), int(member)
        name = f"client-{self.member}.local-factors.safetensors"
        self.path = Path(state_dir) / f"run-{self.run_id}" / name

    def load(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """(tensors, round they were trained in), or None when the node has none for this run."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(_metadata(data).get("fedpeft", "{}"))
            ok = meta.get("format") == FORMAT and meta.get("run") == self.run_id
            ok = ok and meta.get("client") == self.member
            tensors = load_bytes(data) if ok else {}
        except (SafetensorError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise LocalStateCorrupt(
                f"{self.path} is not this node's local-factor file for run {self.run_id}, client "
                f"{self.member}: restore it from a backup, or delete it to restart this node's "
                "personal factors from the initial adapter"
            )
        return tensors, int(meta["round"])

    def save(self, tensors: Mapping[str, torch.Tensor], server_round: int) -> None:
        """Replace the file with `tensors` (trained in `server_round`), atomically."""
        meta = {"format": FORMAT, "run": self.run_id, "client": self.member, "round": server_round}
        data = save_bytes(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            metadata={"fedpeft": json.dumps(meta)},
        )
        write_atomically(self.path, lambda f: f.write(data))


def _metadata(data: bytes) -> dict[str, str]:
    """The metadata of a safetensors blob (its JSON header's __metadata__)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}


def held(state: RecordDict, store: LocalFactorFile) -> dict[str, torch.Tensor]:
    """The local factors this node holds: from `Context.state`, else its file, else none."""
    if STATE_KEY in state.array_records:
        return from_record(state.array_records[STATE_KEY])
    saved = store.load()
    if saved is None:
        return {}
    tensors, server_round = saved
    state[STATE_KEY] = to_record(tensors)
    logger.info("client %d: restored local factors of round %d", store.member, server_round)
    return tensors


def keep(
    state: RecordDict,
    store: LocalFactorFile,
    tensors: Mapping[str, torch.Tensor],
    server_round: int,
) -> None:
    """Remember the round's local factors in `Context.state` and in the node's file."""
    state[STATE_KEY] = to_record(dict(tensors))
    store.save(tensors, server_round)


def split(
    examples: Sequence[T], config: Mapping[str, Any], seed: int, member: int
) -> tuple[list[T], list[T]]:
    """(training examples, held-out slice) by the round's `holdout-fraction` (none: all train)."""
    if HOLDOUT_FRACTION not in config:
        return list(examples), []
    fraction, n = float(config[HOLDOUT_FRACTION]), len(examples)
    if n < 2:
        return list(examples), []
    size = min(n - 1, max(1, round(fraction * n)))
    generator = torch.Generator().manual_seed((seed * 1_000_003 + member * 7_919 + 31) % 2**63)
    held_out = set(torch.randperm(n, generator=generator)[:size].tolist())
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def check_release(settings: DPSettings, policy: NodePolicy, has_ledger: bool) -> None:
    """Refuse to release metrics of the node's own data when anything about the run is private.

    Private round, a policy that requires DP, or budget already spent in this run: the DP
    ledger does not account for evaluation queries, so their answers would leak unaccounted.
    """
    if settings.enabled or policy.required or has_ledger:
        raise PolicyViolation(
            "this node refuses to release personalised evaluation metrics in a private run: they "
            "are computed on its own data and no DP accountant covers them "
            "(fedpeft/privacy/release.py); run without dp to get them"
        )


class LocalFactors(RoundFeature):
    """The round feature: hold a slice out, start from the node's own factors, keep them home."""

    def __init__(self, round_: Round, names: tuple[str, ...]) -> None:
        self.round, self.names = round_, names
        self.store = LocalFactorFile(round_.policy.state_dir, round_.context.run_id, round_.member)

    @classmethod
    def for_round(cls, round_: Round) -> LocalFactors | None:
        """When the config names local factors or a held-out fraction, else None."""
        names = local_names(round_.config)
        if not names and HOLDOUT_FRACTION not in round_.config:
            return None
        return cls(round_, names)

    def examples(self, examples: list[dict]) -> list[dict]:
        """The examples outside the held-out slice."""
        return split(examples, self.round.config, self.round.task.seed, self.round.member)[0]

    def load(self, model: torch.nn.Module) -> None:
        """Start from this node's own local factors (none before its first round)."""
        if self.names:
            adapters.write_adapter(model, held(self.round.context.state, self.store))

    def reply_keys(self, model: torch.nn.Module, keys: list[str]) -> list[str]:
        """Keep the local factors at home (state and file); the rest go back."""
        if not self.names:
            return keys
        kept = [k for k in adapters.adapter_tensors(model) if is_local(k, self.names)]
        state = self.round.context.state
        keep(state, self.store, adapters.read_adapter(model, kept), self.round.server_round)
        return [k for k in keys if not is_local(k, self.names)]
