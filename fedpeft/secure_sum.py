"""Secure aggregation (SecAgg+) of client-level DP's sum: the server sees only the clipped sum.

Flower 1.39 has SecAgg+ only for its legacy API: `SecAggPlusWorkflow` runs the protocol's four
stages on a `Grid` and hands the unmasked result to a legacy `Strategy`'s `aggregate_fit`.
`SecureSum` runs it once per round from fedpeft's own loop: `SumShim`, a legacy Strategy, turns
the round's train messages (`configure_train`) into FitIns carrying the tensor names, the bound C
and the update keys, and catches the unmasked mean; the strategy then releases
`global + (sum + noise) / (q N)` through client-level DP's own noise (`aggregate_secure_sum`).
Nodes clip their own update to C and reply through fedpeft/clients/secure_sum_mods.py.

SecAgg+ quantises each coordinate to `quantization_range` levels over [-C, C] (C the round's
bound) and returns a weighted mean; every node reports weight 1, so the mean times the replies is
the sum. A round that halts (fewer than 2 sampled, too few neighbours left after the key stages)
never reaches `aggregate_fit`: it releases noise alone and counts as a round of the mechanism.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fedpeft.clients.secure_sum_mods import (
    BASE_PREFIX,
    SECAGG_CLIP_NORM,
    SECAGG_COUNT,
    SECAGG_NAMES,
    SECAGG_UPDATE_KEYS,
)
from fedpeft.errors import ConfigError
from fedpeft.privacy.settings import check_values
from fedpeft.protocol import ARRAYS_KEY, CONFIG_KEY
from fedpeft.records import from_record
from fedpeft.schema import integer_in
from fedpeft.strategies.base import LowRankStrategy

#: the workflow's own record keys: its round, and the global parameters it may overwrite
ROUND_CONFIG, PARAMETERS = "config", "parameters"
#: bytes of one masked entry on the wire (SecAgg+ sends int64 arrays)
MASKED_ENTRY_BYTES = 8


@dataclass(frozen=True)
class SecAggSettings:
    """The `secagg` group: SecAgg+'s key sharing and quantisation (SecAggPlusWorkflow's own).

    `num_shares`: an integer > 2, or a fraction of the round's sampled nodes (each node's key is
    split among that many neighbours); `reconstruction_threshold`: the shares that rebuild a key,
    an integer >= 2 below num_shares or a fraction of num_shares; `quantization_range`: levels
    per coordinate over [-C, C]; `modulus_range`: the masks' modulus, a power of 2 larger than
    quantization_range x the largest cohort (the sum must not wrap).
    """

    enabled: bool = False
    num_shares: float = 0.5
    reconstruction_threshold: float = 0.5
    quantization_range: int = 2**22
    modulus_range: int = 2**32

    @classmethod
    def parse(cls, raw: object, where: str = "secagg") -> SecAggSettings:
        """Validate a `secagg` mapping: unknown keys and values SecAgg+ refuses are refused."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping of secure aggregation settings")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ConfigError(
                f"{where} has unknown key(s) {', '.join(unknown)}: the secure aggregation "
                f"settings are {', '.join(known)}"
            )
        v = {**{f.name: f.default for f in fields(cls)}, **dict(raw)}
        if not isinstance(v["enabled"], bool):
            raise ConfigError(f"{where}.enabled={v['enabled']} must be true or false")
        shares, threshold = v["num_shares"], v["reconstruction_threshold"]
        quant, modulus = v["quantization_range"], v["modulus_range"]
        checks = [
            (
                "num_shares",
                _fraction(shares) or (_integer(shares) and shares > 2),
                "a fraction in (0, 1] of the sampled nodes, or an integer > 2, e.g. 0.5",
            ),
            (
                "reconstruction_threshold",
                _fraction(threshold) or (_integer(threshold) and threshold >= 2),
                "a fraction in (0, 1] of num_shares, or an integer >= 2, e.g. 0.5",
            ),
            (
                "quantization_range",
                integer_in(quant, 2, 2**30),
                "an integer in [2, 2^30], e.g. 4194304 (2^22)",
            ),
            (
                "modulus_range",
                _integer(modulus) and modulus <= 2**32 and bin(modulus).count("1") == 1,
                "a power of 2 at most 2^32, e.g. 4294967296",
            ),
        ]
        check_values(where, v, checks)
        if _integer(shares) and _integer(threshold) and threshold >= shares:
            raise ConfigError(
                f"{where}.reconstruction_threshold={threshold} must be below "
                f"{where}.num_shares={shares}"
            )
        return cls(**{k: float(x) if _fraction(x) else x for k, x in v.items()})

    def max_cohort(self) -> int:
        """The most nodes whose quantised sum fits the modulus without wrapping."""
        return (self.modulus_range - 1) // self.quantization_range

    def workflow(self, clip_norm: float, timeout: float | None) -> SecAggPlusWorkflow:
        """SecAgg+ for one round: weight 1 per node, coordinates quantised over [-C, C]."""
        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=1.0,
            clipping_range=float(clip_norm),
            quantization_range=int(self.quantization_range),
            modulus_range=int(self.modulus_range),
            timeout=timeout,
        )


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction(value: object) -> bool:
    return isinstance(value, float) and 0 < value <= 1


def secagg_settings(cfg: DictConfig) -> SecAggSettings:
    """The run's `secagg` group, parsed (disabled when the config has none)."""
    raw = cfg.get("secagg")
    return SecAggSettings.parse(None if raw is None else OmegaConf.to_container(raw, resolve=True))


class NodeProxy(ClientProxy):
    """A legacy ClientProxy that only names a node: the workflow reads nothing else."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:
        """Not used by SecAgg+."""
        raise NotImplementedError

    def get_parameters(self, *args: Any, **kwargs: Any) -> Any:
        """Not used by SecAgg+."""
        raise NotImplementedError

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Not used by SecAgg+."""
        raise NotImplementedError

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Not used by SecAgg+."""
        raise NotImplementedError

    def reconnect(self, *args: Any, **kwargs: Any) -> Any:
        """Not used by SecAgg+."""
        raise NotImplementedError


@dataclass
class Unmasked:
    """What the workflow's aggregate_fit got: the unmasked sum, its parts, and who sent it."""

    total: list[np.ndarray]
    nodes: list[int]


class SumShim(LegacyStrategy):
    """A legacy Strategy fed by fedpeft's train messages; catches the securely summed vector."""

    def __init__(self) -> None:
        self.pairs: list[tuple[ClientProxy, FitIns]] = []
        self.result: Unmasked | None = None

    def load(
        self,
        messages: Iterable[Message],
        update_keys: Sequence[str],
        start: Mapping[str, torch.Tensor],
        clip_norm: float,
        count: bool,
    ) -> None:
        """FitIns for each train message: its tensors in order, their names, C, the update keys.

        A node whose payload does not hold an update key's start value as the server has it
        (`start`) gets that value under BASE_PREFIX, to subtract but not load.
        """
        self.result = None
        self.pairs = []
        for msg in messages:
            payload = from_record(msg.content[ARRAYS_KEY])
            for key in update_keys:
                if key not in payload or not torch.equal(payload[key].float(), start[key]):
                    payload[BASE_PREFIX + key] = start[key]
            config = dict(msg.content[CONFIG_KEY])
            config.update(
                {
                    SECAGG_NAMES: json.dumps(list(payload)),
                    SECAGG_UPDATE_KEYS: json.dumps(list(update_keys)),
                    SECAGG_CLIP_NORM: float(clip_norm),
                    SECAGG_COUNT: count,
                }
            )
            arrays = [t.detach().cpu().numpy() for t in payload.values()]
            fitins = FitIns(ndarrays_to_parameters(arrays), config)
            self.pairs.append((NodeProxy(msg.metadata.dst_node_id), fitins))

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        """The global adapter lives in the fedpeft strategy."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The round's FitIns (`load`), one per node fedpeft's strategy sampled."""
        return list(self.pairs)

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Keep n x the unmasked mean (every node's weight is 1): the sum of the clipped updates."""
        if results:
            mean = parameters_to_ndarrays(results[0][1].parameters)
            n = len(results)
            self.result = Unmasked(
                [np.asarray(a, dtype=np.float64) * n for a in mean],
                [int(proxy.node_id) for proxy, _ in results],  # type: ignore[attr-defined]
            )
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any):
        """Not used: fedpeft evaluates on its own."""
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any):
        """Not used: fedpeft evaluates on its own."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        """Not used: fedpeft evaluates on its own."""
        return None


class PrivateCopies:
    """A Grid that gives each message its own content, as a real transport does.

    SecAgg+'s setup stage sends one content object to every node, and the client mod pops from
    it; an in-process grid would let the first node's pop reach the others.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send copies where several messages share one content object."""
        seen: set[int] = set()
        own = []
        for msg in messages:
            if id(msg.content) in seen:
                msg.content = copy.deepcopy(msg.content)
            seen.add(id(msg.content))
            own.append(msg)
        return self.grid.send_and_receive(own, timeout=timeout)


class SecureSum:
    """One SecAgg+ round per fedpeft round, released by the strategy's client-level DP."""

    def __init__(
        self, strategy: LowRankStrategy, settings: SecAggSettings, timeout: float | None
    ) -> None:
        if strategy.client_dp is None:
            raise ValueError("secagg.enabled=true needs client_dp.enabled=true")
        if strategy.canary_clients is not None:
            raise ValueError("a canary audit joins replies on the server: not under secagg")
        self.strategy = strategy
        self.settings = settings
        self.timeout = timeout
        self.shim = SumShim()
        self.context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=self.shim,
        )

    @classmethod
    def from_config(cls, cfg: DictConfig, strategy: LowRankStrategy) -> SecureSum | None:
        """The run's secure aggregation, or None when `secagg.enabled` is false."""
        settings = secagg_settings(cfg)
        if not settings.enabled:
            return None
        return cls(strategy, settings, cfg.federation.round_timeout)

    def run_round(self, grid: Grid, server_round: int, messages: Iterable[Message]) -> None:
        """Sum the sampled nodes' clipped updates under SecAgg+ and release the noisy mean."""
        strategy = self.strategy
        mechanism = strategy.client_dp
        assert mechanism is not None
        messages = list(messages)
        keys = strategy.up_keys()
        start = {k: strategy.global_adapter[k] for k in keys}
        self.shim.load(messages, keys, start, mechanism.clip_norm, mechanism.adaptive)
        state = self.context.state
        state.config_records[ROUND_CONFIG] = ConfigRecord({"current_round": server_round})
        state.array_records[PARAMETERS] = ArrayRecord()
        workflow = self.settings.workflow(mechanism.clip_norm, self.timeout)
        workflow(PrivateCopies(grid), self.context)  # type: ignore[arg-type]
        result = self.shim.result
        sampled = [m.metadata.dst_node_id for m in messages]
        if result is None:
            reason = (
                "no secure sum this round (SecAgg+ halted: fewer than 2 sampled, or too many "
                "dropped out before the masked vectors); noise alone was released"
            )
            failed = {node: reason for node in sampled}
            strategy.aggregate_secure_sum(server_round, None, 0.0, 0, failed)
            return
        total, unclipped = self._split(result.total, keys, start, mechanism.clip_norm)
        reason = "no masked vector reached the server (dropped out or failed; not visible here)"
        failed = {node: reason for node in sampled if node not in result.nodes}
        strategy.aggregate_secure_sum(server_round, total, unclipped, len(result.nodes), failed)
        entries = sum(a.size for a in result.total) + 1  # + the weight entry SecAgg+ prepends
        strategy.stats.bytes_up = len(result.nodes) * entries * MASKED_ENTRY_BYTES

    def _split(
        self,
        total: list[np.ndarray],
        keys: list[str],
        start: Mapping[str, torch.Tensor],
        clip_norm: float,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The summed update under `keys`, and the count of unclipped updates (adaptive only)."""
        if len(total) not in (len(keys), len(keys) + 1):
            raise ValueError(f"the secure sum has {len(total)} tensors for {len(keys)} keys")
        summed = {
            k: torch.from_numpy(np.asarray(a)).reshape(start[k].shape)
            for k, a in zip(keys, total, strict=False)
        }
        unclipped = 0.0
        if len(total) == len(keys) + 1:
            unclipped = float(np.round(float(total[-1].reshape(-1)[0]) / clip_norm))
        return summed, unclipped
