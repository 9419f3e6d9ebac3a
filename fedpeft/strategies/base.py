"""Shared base of fedpeft's strategies: sampling, payloads, reply validation, weights, bytes.

A method subclasses `LowRankStrategy` and says three things: which global tensors go down to a
client (`down_keys`), which tensors a client must send back (`up_keys`), and how the valid replies
become the new global adapter (`aggregate_updates`). Optional hooks: per-node extra payload and
config (`node_payload`), per-node reply shapes (`up_specs`), a calibration step before round 1
(`calibration_examples`, `calibrate`), and a plain-LoRA export for saving (`export_lora`,
`base_stacks`). A method that keeps per-node state on clients names the reply metric that reports
it (`version_metric`); the base tracks node -> version and resets a node to 0 when it fails or
does not reply in time.

Nodes are known by their Flower node id, which a simulation draws at random in every process.
When the server has learnt each node's stable identity (its data partition, `identify`), sampling,
reply order and per-client records follow that identity instead, so that a run is reproducible
and a resumed run picks up where it stopped. The example count a node declared with its identity
bounds what its replies may claim (declared.py). `state_dict` and `load_state_dict` carry everything
a resumed server needs; methods extend them with their own state.

Drift correction composes with a method through two options the base owns (config groups
`server_opt` and `client_opt`):
- a server optimiser (FedAvgM, FedAdam, FedYogi, FedAdagrad; server_opt.py) takes the pseudo-
  gradient Delta = x_avg - x of the tensors the method keeps as the weighted average of the
  replies (`server_opt_keys`, by default `up_keys`) right after `aggregate_updates`, and replaces
  x_avg by its own step from x;
- SCAFFOLD (Karimireddy et al., ICML 2020, option II): the server keeps a control variate c on the
  `up_keys` tensors, sends it down as `control.<key>`, takes each client's delta c_k back as
  `control.<key>` and updates c += (|S| / N) sum_k p_k delta c_k (p_k: the round's weights; with
  equal n_k this is the paper's mean). Both count in the round's bytes and live in `state_dict`.
FedProx needs no server part (clients/drift.py). A method says whether these options mean anything
for it with `drift_refusal`; the base refuses both, so a method opts in by overriding it.
"""

from __future__ import annotations

import inspect
import json
import random
import time
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedpeft import identity, lowrank
from fedpeft.adapters import CONTROL_PREFIX
from fedpeft.records import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    CONFIG_KEY,
    METRICS_KEY,
    TASK_KEY,
    TensorSpec,
    UpdateRejected,
    addressees,
    answered_node,
    check_norms,
    record_bytes,
    short_reason,
    tensor_bytes,
    to_record,
    validate_update,
)
from fedpeft.strategies import update_noise
from fedpeft.strategies.declared import claim_refusal
from fedpeft.strategies.privacy_watch import PrivacyWatch
from fedpeft.strategies.ranks import check_ranks, check_scaling
from fedpeft.strategies.server_opt import ServerOptimizer

#: num-examples bound passed to reply validation when the server sets no cap.
NO_CAP = 2**63 - 1


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


class LowRankStrategy(Strategy):
    """Base for low-rank federated strategies on the Flower Message API.

    Parameters
    ----------
    global_adapter : dict[str, torch.Tensor]
        The round-0 adapter and head tensors under fedpeft's canonical keys (see adapters.py).
    task : dict
        The instructions every client needs to rebuild the same model, adapter and data
        (serialised as JSON into each train message's ConfigRecord).
    train_head : bool
        Whether clients train the classification head, which is then sent both ways and averaged.
    fraction : float
        Fraction of connected nodes sampled per round, in (0, 1].
    min_clients : int
        At least this many nodes are sampled, and a round needs this many valid replies.
    seed : int
        Seed of the server's node sampling, so that a run is reproducible.
    max_num_examples : int or None
        Largest num-examples a reply may claim; larger claims are rejected (None: no cap).
    median_multiple : float or None
        Without a cap: a claim may be at most this multiple of the median declared example count
        (declared.py).
    norm_bound : float or None
        Optional bound on every replied tensor's Frobenius norm.
    wait_timeout : float
        Seconds to wait for `min_clients` nodes to connect before a round.
    server_opt : dict or None
        A server optimiser on the averaged tensors: `ServerOptimizer`'s keywords (name, lr,
        betas, tau, momentum); None or name "none": plain averaging.
    scaffold : bool
        Keep SCAFFOLD's server control variate c and exchange control variates with clients.
    num_clients : int or None
        N, the number of clients in the federation (SCAFFOLD's |S| / N); None: the nodes
        connected when the round was sampled.
    """

    #: the method's config name (`strategy=<name>`), declared by each method's class
    name: ClassVar[str] = ""
    #: options a parent class takes that this method does not (they are unknown params here)
    refused_options: ClassVar[frozenset[str]] = frozenset()
    kind: ClassVar[str] = "lora"
    #: reply metric with the version of per-node state a client holds (None: no such state)
    version_metric: ClassVar[str | None] = None
    #: server-held calibration examples this method needs before round 1 (0: none)
    calibration_examples: int = 0
    #: why this method has not been composed with the drift options (None: the base's reason)
    drift_note: ClassVar[str | None] = None
    #: the drift-correction options `drift_refusal` judges
    DRIFT_OPTIONS: ClassVar[tuple[str, ...]] = ("server_opt", "scaffold")
    #: "global": the server evaluates the global adapter on its held-out split; "personalised":
    #: there is no global model, clients score their own (configure_evaluate, aggregate_evaluate)
    evaluation: ClassVar[str] = "global"

    def __init__(
        self,
        global_adapter: Mapping[str, torch.Tensor],
        task: Mapping[str, Any],
        *,
        train_head: bool = True,
        fraction: float = 1.0,
        min_clients: int = 1,
        seed: int = 0,
        max_num_examples: int | None = 10_000_000,
        median_multiple: float | None = None,
        norm_bound: float | None = None,
        wait_timeout: float = 600.0,
        server_opt: Mapping[str, Any] | None = None,
        scaffold: bool = False,
        num_clients: int | None = None,
    ) -> None:
        self.global_adapter = {k: v.detach().clone().float() for k, v in global_adapter.items()}
        self.task = dict(task)
        self.train_head = train_head
        self.fraction = fraction
        self.min_clients = min_clients
        self.max_num_examples = max_num_examples
        self.median_multiple = median_multiple
        self.norm_bound = norm_bound
        self.wait_timeout = wait_timeout
        self.rng = random.Random(seed)
        self.stats = RoundStats()
        self.server_round = 0
        self.known_versions: dict[int, int] = {}
        self.identities: dict[int, int] = {}
        self.declared: dict[int, int] = {}
        self.pending: list[int] = []
        self.sent: list[Message] = []
        self.node_ranks: dict[int, int] = {}
        self.exhausted: set[int] = set()
        self.privacy = PrivacyWatch()
        self.connected = 0
        self.num_clients = num_clients
        self.server_opt = None
        if server_opt is not None and server_opt.get("name", "none") != "none":
            self._refuse("server_opt", server_opt["name"])
            self.server_opt = ServerOptimizer(**server_opt)
        self.scaffold = bool(scaffold)
        self.control: dict[str, torch.Tensor] = {}
        if self.scaffold:
            self._refuse("scaffold", "true")
            self.control = {k: torch.zeros_like(self.global_adapter[k]) for k in self.up_keys()}

    # -- what each method defines -------------------------------------------------------------
    @abstractmethod
    def down_keys(self, node_id: int) -> list[str]:
        """Global tensors this node must load before training this round."""

    @abstractmethod
    def up_keys(self) -> list[str]:
        """Tensors a client sends back after training."""

    @abstractmethod
    def aggregate_updates(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Fold the valid replies (weights p_k summing to 1) into `self.global_adapter`."""

    # -- drift correction (server optimisers, SCAFFOLD) ---------------------------------------
    @classmethod
    def drift_refusal(cls, option: str, params: Mapping[str, Any]) -> str | None:
        """Why `option` ("server_opt" or "scaffold") means nothing here, or None if it composes.

        `params` are the method's strategy.params. The base refuses (a method opts in), with the
        method's `drift_note` when it has one.
        """
        return cls.drift_note or (
            "it does not keep its global as the weighted average of its clients' replies, which "
            "is what a server optimiser steps from and SCAFFOLD's control variates live on"
        )

    @classmethod
    def options(cls) -> set[str]:
        """What strategy.params may set: the constructor keywords of this method's own classes.

        Keywords of the shared base (fraction, seed, ...) come from other config groups.
        """
        options: set[str] = set()
        for klass in cls.__mro__:
            if klass is LowRankStrategy or not issubclass(klass, LowRankStrategy):
                break
            params = inspect.signature(klass.__init__).parameters.values()
            named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            options |= {p.name for p in params if p.kind in named} - {
                "self",
                "global_adapter",
                "task",
            }
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                break
        return options - cls.refused_options

    @classmethod
    def check_params(
        cls, params: Mapping[str, Any], strategy: Mapping[str, Any], adapter_rank: int
    ) -> None:
        """Raise ValueError, naming the key and a fix, for options this method cannot run with.

        `params` are strategy.params, `strategy` the whole strategy group. The base checks
        per-client ranks and their scaling; a method with options of its own adds to this.
        """
        refused = sorted(k for k in cls.refused_options if params.get(k) is not None)
        if refused:
            raise ValueError(
                f"strategy.params.{refused[0]} is not an option of {cls.method()}: every client "
                "trains at adapter.rank here; drop it"
            )
        if params.get("ranks") is not None:
            ranks = params["ranks"]
            check_ranks(ranks if isinstance(ranks, list) else [ranks])
        if "scaling" in params:
            check_scaling(params["scaling"])

    @classmethod
    def base_refusal(cls, quantization: str, params: Mapping[str, Any]) -> str | None:
        """Why this method cannot train on a `quantization` (4bit, 8bit) base, or None."""
        return None

    @classmethod
    def resume_refusal(cls) -> str | None:
        """Why a run of this method cannot be resumed from its checkpoint, or None."""
        return None

    def _refuse(self, option: str, value: str) -> None:
        reason = self.drift_refusal(option, {})
        if reason is not None:
            raise ValueError(f"{self._drift_field(option)}={value} with {self.method()}: {reason}")

    @staticmethod
    def _drift_field(option: str) -> str:
        return "server_opt.name" if option == "server_opt" else "client_opt.scaffold"

    @classmethod
    def method(cls) -> str:
        """The strategy's config name (`name`), or the class name of a class without one."""
        return cls.name or cls.__name__

    def server_opt_keys(self) -> list[str]:
        """The global tensors the method sets to the weighted average of the replies each round."""
        return self.up_keys()

    def control_payload(self) -> dict[str, torch.Tensor]:
        """SCAFFOLD's server control variate c as `control.<key>` (empty without SCAFFOLD)."""
        return {f"{CONTROL_PREFIX}{k}": v for k, v in self.control.items()}

    def control_specs(self) -> dict[str, TensorSpec]:
        """The delta c_k a SCAFFOLD reply must carry, with the shapes of c."""
        return {f"{CONTROL_PREFIX}{k}": TensorSpec(tuple(v.shape)) for k, v in self.control.items()}

    def _drift_step(
        self,
        previous: Mapping[str, torch.Tensor],
        deltas: list[dict[str, torch.Tensor]],
        weights: torch.Tensor,
    ) -> None:
        """After `aggregate_updates`: the server optimiser's step, then c += |S|/N sum p_k dc_k."""
        if self.server_opt is not None:
            averaged = {k: self.global_adapter[k] for k in previous}
            self.global_adapter.update(self.server_opt.step(previous, averaged))
        if self.scaffold and deltas:
            total = self.num_clients or self.connected or len(deltas)
            share = min(1.0, len(deltas) / total)
            for key in self.control:
                stacked = torch.stack([d[f"{CONTROL_PREFIX}{key}"].double() for d in deltas])
                mean = torch.einsum("k,k...->...", weights.double(), stacked)
                self.control[key] = (self.control[key].double() + share * mean).float()

    # -- shared helpers -----------------------------------------------------------------------
    def head_keys(self) -> list[str]:
        """The head's keys when it is trained (and therefore exchanged)."""
        return [k for k in self.global_adapter if k.startswith("head.")] if self.train_head else []

    def factor_keys(self, *factors: str) -> list[str]:
        """Global keys of the named LoRA factors, in layer order."""
        return [k for k in self.global_adapter if k.endswith(tuple(f".{f}" for f in factors))]

    def average_into_global(
        self, updates: list[dict[str, torch.Tensor]], weights: torch.Tensor
    ) -> None:
        """Weighted average of every replied tensor, as one batched call over a flat stack."""
        keys = list(updates[0])
        flat = torch.stack([torch.cat([u[k].reshape(-1) for k in keys]) for u in updates])
        mean = lowrank.weighted_average(flat, weights)
        offset = 0
        for key in keys:
            size = updates[0][key].numel()
            self.global_adapter[key] = mean[offset : offset + size].view_as(updates[0][key]).clone()
            offset += size

    def layer_groups(self) -> list[list[str]]:
        """Adapted layers grouped by (A shape, B shape), so the math runs batched per group."""
        groups: dict[tuple, list[str]] = {}
        for key in self.factor_keys("lora_A"):
            name = key.removesuffix(".lora_A")
            shape = (*self.global_adapter[key].shape, *self.global_adapter[f"{name}.lora_B"].shape)
            groups.setdefault(shape, []).append(name)
        return list(groups.values())

    def stack_factor(self, names: list[str], factor: str, source=None) -> torch.Tensor:
        """One factor of the named layers stacked along a new leading layer axis."""
        source = self.global_adapter if source is None else source
        return torch.stack([source[f"{name}.{factor}"] for name in names])

    def unstack_factor(self, names: list[str], factor: str, stacked: torch.Tensor) -> None:
        """Write a layer-stacked factor back into the global adapter."""
        for name, value in zip(names, stacked, strict=True):
            self.global_adapter[f"{name}.{factor}"] = value.contiguous()

    def round_instructions(self, server_round: int) -> dict[str, Any]:
        """Per-round additions to the task (methods extend this)."""
        return {}

    def node_payload(self, node_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Extra tensors and config entries for one node this round (methods extend this)."""
        return {}, {}

    def up_specs(self, node_id: int) -> dict[str, TensorSpec]:
        """The tensors, with shapes, this node's reply must hold."""
        return {k: TensorSpec(tuple(self.global_adapter[k].shape)) for k in self.up_keys()}

    def calibrate(self, gradients: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Initialise from (layer, full-weight gradient) pairs on server-held calibration data."""
        raise NotImplementedError(f"{type(self).__name__} takes no calibration data")

    def base_stacks(self) -> list[dict[str, torch.Tensor]]:
        """Stacked modules merged into the base weights so far, in order (methods extend this)."""
        return []

    def export_lora(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The global model as one plain LoRA of scaling 1 and its rank, or None to save as is."""
        return None

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """What the server holds of the model (a personalised method saves this, not an adapter)."""
        return dict(self.global_adapter)

    def global_record(self) -> ArrayRecord:
        """The whole global adapter as an ArrayRecord (what gets checkpointed)."""
        return to_record(self.global_adapter)

    # -- identities and resumable state ----------------------------------------------------
    #: Seconds to wait for the identity of a sampled node not identified yet, asked before its
    #: first train message (None: never ask here; the server sets it in simulations, see
    #: fedpeft/identity.py). Until then it is sampled under `expected_names`.
    identify_sampled_timeout: float | None = None
    #: Node id -> the name a not yet identified simulated node will answer with (its position in
    #: Flower's registration order, identity.registration_names).
    expected_names: Mapping[int, int] = MappingProxyType({})

    def identify(
        self, identities: Mapping[int, int], declared: Mapping[int, int] | None = None
    ) -> None:
        """Learn node id -> stable identity and node id -> declared example count for more nodes.

        A node that takes an identity over (a SuperNode restarted under a new node id) replaces
        the node that held it, its declaration included.
        """
        gone = {n for n, m in self.identities.items() if m in set(identities.values())}
        self.identities = {n: m for n, m in self.identities.items() if n not in gone}
        self.declared = {n: c for n, c in self.declared.items() if n not in gone}
        self.identities.update(identities)
        self.declared.update(declared or {})

    def member(self, node_id: int) -> int:
        """The node's stable identity when known, else its node id."""
        return self.identities.get(node_id, node_id)

    def assign_rank(self, node_id: int, ranks: Sequence[int]) -> int:
        """ranks[i % n] for the i-th client first sampled, kept for the run and across resumes."""
        member = self.member(node_id)
        if member not in self.node_ranks:
            self.node_ranks[member] = int(ranks[len(self.node_ranks) % len(ranks)])
        return self.node_ranks[member]

    def _order(self, node_id: int) -> tuple[int, int, int]:
        """Sort key: a node's identity, else the name it is expected to answer, else its node id."""
        if node_id in self.identities:
            return (0, self.identities[node_id], node_id)
        if node_id in self.expected_names:
            return (0, self.expected_names[node_id], node_id)
        return (1, node_id, node_id)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able state) a resumed server needs; methods extend both."""
        version, internal, gauss = self.rng.getstate()
        meta = {
            "server_round": self.server_round,
            "rng": [version, list(internal), gauss],
            "node_ranks": [[m, r] for m, r in self.node_ranks.items()],
            "exhausted": sorted(self.exhausted),
            "privacy": self.privacy.state(),
        }
        tensors = {f"global.{k}": v for k, v in self.global_adapter.items()}
        tensors.update(self.control_payload())
        if self.server_opt is not None:
            opt_tensors, meta["server_opt"] = self.server_opt.state_dict()
            tensors.update(opt_tensors)
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what `state_dict` gave. Client-held state is not assumed: nodes are resent it."""
        saved = {
            k.removeprefix("global."): v for k, v in tensors.items() if k.startswith("global.")
        }
        if set(saved) != set(self.global_adapter):
            raise ValueError("the checkpoint's global adapter does not match this run's adapter")
        self.global_adapter = {k: v.float().clone() for k, v in saved.items()}
        self.server_round = int(meta["server_round"])
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.node_ranks = {int(m): int(r) for m, r in meta["node_ranks"]}
        self.exhausted = {int(m) for m in meta.get("exhausted", [])}
        self.privacy = PrivacyWatch.from_state(meta.get("privacy"))
        self.known_versions = {}
        for key in self.control:
            self.control[key] = tensors[f"{CONTROL_PREFIX}{key}"].float().clone()
        if self.server_opt is not None:
            if "server_opt" not in meta:
                raise ValueError(
                    "the checkpoint has no server optimiser state: resume with server_opt.name=none"
                )
            self.server_opt.load_state_dict(tensors, meta["server_opt"])

    def _sample(self, grid: Grid) -> list[int]:
        """Sample this round's nodes by identity; with `identify_sampled_timeout`, ask the new ones.

        Costs O(connected nodes) in sorting and O(sampled nodes) in messages.
        """
        deadline = time.monotonic() + self.wait_timeout
        while len(nodes := list(grid.get_node_ids())) < self.min_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {self.min_clients} nodes connected")
            time.sleep(1.0)
        lazy = self.identify_sampled_timeout is not None
        if lazy and any(n not in self.identities and n not in self.expected_names for n in nodes):
            self.expected_names = identity.registration_names(grid)
        nodes.sort(key=self._order)
        self.connected = len(nodes)
        size = min(len(nodes), max(self.min_clients, int(self.fraction * len(nodes))))
        eligible = [n for n in nodes if self.member(n) not in self.exhausted]
        if len(eligible) < size:
            log(
                WARNING,
                "round %d: %d of %d clients have spent their privacy budget; sampling %d",
                self.server_round,
                len(nodes) - len(eligible),
                len(nodes),
                len(eligible),
            )
        sampled = self.rng.sample(eligible, min(size, len(eligible)))
        new = sorted((n for n in sampled if n not in self.identities), key=self._order)
        if lazy and new:
            connected = set(nodes)
            held = {n: m for n, m in self.identities.items() if n in connected}
            names, declared = identity.ask(
                grid, new, self.task, float(self.identify_sampled_timeout), held
            )
            for node, name in names.items():
                if self.expected_names.get(node, name) != name:
                    log(
                        WARNING,
                        "node %d answered name %d where Flower's registration order gave %d",
                        node,
                        name,
                        self.expected_names[node],
                    )
            self.identify(names, declared)
        return sorted(sampled, key=self._order)

    # -- Flower's Strategy interface ----------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(
            INFO,
            "%s: kind=%s fraction=%.2f min_clients=%d train_head=%s server_opt=%s scaffold=%s",
            type(self).__name__,
            self.kind,
            self.fraction,
            self.min_clients,
            self.train_head,
            self.server_opt.name if self.server_opt is not None else "none",
            self.scaffold,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled node with exactly the tensors that node must load."""
        self.stats = RoundStats()
        self.server_round = server_round
        task = json.dumps({**self.task, **self.round_instructions(server_round)})
        messages = []
        for node_id in self._sample(grid):
            extra, node_config = self.node_payload(node_id)
            payload = to_record(
                {
                    **{k: self.global_adapter[k] for k in self.down_keys(node_id)},
                    **extra,
                    **self.control_payload(),
                }
            )
            self.stats.bytes_down += record_bytes(payload)
            content = RecordDict(
                {
                    ARRAYS_KEY: payload,
                    CONFIG_KEY: ConfigRecord(
                        {**config, **node_config, "server-round": server_round, TASK_KEY: task}
                    ),
                }
            )
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        self.stats.sampled = len(messages)
        self.pending = [m.metadata.dst_node_id for m in messages]
        self.sent = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop bad ones with a logged reason, aggregate the rest.

        Replies are taken in the order of the nodes' identities, not of their arrival, so that the
        floating-point sums are the same in every run. Per-client records are keyed by identity.
        A sampled node that sent no reply (it timed out) counts as failed.
        """
        self.server_round = server_round
        updates, weights, losses, deltas, noise_stds = [], [], [], [], []
        by_node = {}
        for msg in replies:
            node = self._sender(msg)
            if node in by_node:
                log(WARNING, "round %d: ignoring a second reply from node %d", server_round, node)
                continue
            by_node[node] = msg
        for node in self.pending:
            if node not in by_node:
                self._fail(node, "no reply before the round timeout")
        self.pending = []
        for node in sorted(by_node, key=self._order):
            msg, member = by_node[node], self.member(node)
            if msg.has_error():
                self._fail(node, short_reason(msg.error.reason))
                continue
            self._track_version(node, msg)
            try:
                self._watch_ledger(member, msg)
                cap = self.max_num_examples or NO_CAP
                specs = {**self.up_specs(node), **self.control_specs()}
                tensors, weight = validate_update(msg.content, specs, cap, None)
                check_norms(tensors, self.up_specs(node), self.norm_bound)  # not SCAFFOLD's dc_k
                refusal = claim_refusal(
                    weight, self.declared.get(node), self.declared.values(), self.median_multiple
                )
                if refusal is not None:
                    raise UpdateRejected(refusal)
            except UpdateRejected as exc:
                self.stats.rejected[member] = str(exc)
                log(
                    WARNING,
                    "round %d: reply from client %d rejected: %s",
                    server_round,
                    member,
                    exc,
                )
                continue
            metrics = msg.content.metric_records[METRICS_KEY]
            self.stats.bytes_up += tensor_bytes(tensors)
            if "train-loss" in metrics:  # private replies carry none (privacy/release.py)
                self.stats.client_loss[member] = float(metrics["train-loss"])
            deltas.append({k: tensors.pop(k) for k in self.control_specs()})
            updates.append(tensors)
            weights.append(weight)
            self.stats.accepted.append(member)
            losses.append(self.stats.client_loss.get(member))
            noise_stds.append(self._noise_std(metrics))
        self.stats.replied = len(updates)
        if len(updates) < self.min_clients:
            log(
                WARNING,
                "round %d: %d valid replies < min_clients=%d; global adapter unchanged",
                server_round,
                len(updates),
                self.min_clients,
            )
            return None, None
        started = time.perf_counter()
        p = lowrank.normalize_weights(weights)
        self._measure_noise(updates, p, noise_stds)
        previous = (
            {k: self.global_adapter[k].clone() for k in self.server_opt_keys()}
            if self.server_opt is not None
            else {}
        )
        self.aggregate_updates(updates, p)
        self._drift_step(previous, deltas, p)
        self.stats.aggregate_s = time.perf_counter() - started
        if None not in losses:
            self.stats.train_loss = float(
                sum(pk * lk for pk, lk in zip(p.tolist(), losses, strict=True))
            )
        metrics = MetricRecord(
            {"num-replies": len(updates)}
            if self.stats.train_loss is None
            else {"train-loss": self.stats.train_loss, "num-replies": len(updates)}
        )
        return self.global_record(), metrics

    def _noise_std(self, metrics: Mapping[str, Any]) -> float | None:
        """Per-coordinate DP noise std in a reply's tensors (None: not private or not plain SGD)."""
        dp, train = self.task.get("dp") or {}, self.task.get("train") or {}
        if not dp.get("enabled") or train.get("optimizer") != "sgd" or train.get("momentum"):
            return None
        return update_noise.client_noise_std(metrics, 1.0, float(dp["max_grad_norm"]))

    def _measure_noise(
        self, updates: list[dict[str, torch.Tensor]], p: torch.Tensor, stds: list[float | None]
    ) -> None:
        """Record the round's ||Delta|| and, for private SGD replies, its expected noise norm."""
        before = {k: self.global_adapter[k] for k in self.up_keys() if k in self.global_adapter}
        train = self.task.get("train") or {}
        lr, head_lr = float(train.get("lr") or 0.0), train.get("head_lr")
        heads = set(self.head_keys())
        rates = {k: float(head_lr) if k in heads and head_lr is not None else lr for k in before}
        norms = update_noise.update_and_noise_norms(
            before, updates, p, [s or 0.0 for s in stds], rates
        )
        if norms is not None:
            self.stats.update_norm = norms[0]
            self.stats.dp_noise_norm = norms[1] if None not in stds else None

    def _watch_ledger(self, member: int, msg: Message) -> None:
        """Record the reply's reported epsilon (rejected or not) and reject a ledger that reset.

        A client whose ledger went backwards is not sampled again: its true spending is unknown.
        """
        metrics = msg.content.metric_records.get(METRICS_KEY) or {}
        private_run = bool((self.task.get("dp") or {}).get("enabled"))
        reason = self.privacy.observe(member, metrics, private_run)
        if member in self.privacy.epsilon and "epsilon" in metrics:
            self.stats.client_epsilon[member] = float(metrics["epsilon"])
        if reason is not None:
            if "was reset" in reason:
                self.exhausted.add(member)
            raise UpdateRejected(reason)

    def _sender(self, msg: Message) -> int:
        """The node a reply answers for, matching SuperLink-made errors to their train message.

        The error the SuperLink sends for a node that became unavailable carries its own id.
        """
        node = msg.metadata.src_node_id
        if node in self.pending or not msg.has_error():
            return node
        return answered_node(msg, addressees(self.sent))  # ids exist once the grid has sent

    def _fail(self, node: int, reason: str) -> None:
        """Record a node that failed or timed out; it may have lost its state, so resend it all.

        A client that spent its privacy budget is not sampled again (it would only refuse).
        """
        if BUDGET_EXHAUSTED in reason:
            self.exhausted.add(self.member(node))
        self.stats.failed[self.member(node)] = reason
        if self.version_metric is not None:
            self.known_versions[node] = 0
        log(WARNING, "round %d: client %d failed: %s", self.server_round, self.member(node), reason)

    def _track_version(self, node: int, msg: Message) -> None:
        """Remember the state version a node reports (0 when it reports none or nonsense)."""
        if self.version_metric is None:
            return
        metrics = msg.content.metric_records.get(METRICS_KEY)
        value = metrics.get(self.version_metric) if metrics is not None else None
        ok = isinstance(value, int | float) and value >= 0 and value == int(value)
        self.known_versions[node] = int(value) if ok else 0

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Fedpeft evaluates the global adapter on the server's held-out split, not on clients."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """No client-side evaluation (see configure_evaluate)."""
        return None
