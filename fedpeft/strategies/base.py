"""Shared base of fedpeft's strategies: the hooks a method defines and Flower's round around them.

A method subclasses `LowRankStrategy` and says three things: which global tensors go down to a
client (`down_keys`), which tensors a client must send back (`up_keys`), and how the valid replies
become the new global adapter (`aggregate_updates`). Optional hooks: per-node extra payload and
config (`node_payload`), per-node reply shapes (`up_specs`, or `reply_specs` when they follow what
the reply reports), what to learn from the accepted replies (`accept`), a calibration step before
round 1 (`calibration_examples`, `calibrate`), and a plain-LoRA export for saving (`export_lora`,
`base_stacks`). A method that keeps per-node state on clients names the reply metric that reports
it (`version_metric`); the roster then tracks node -> version and resets a node to 0 when it fails
or does not reply in time. The method's parameters, checks and refusals live on its class
(`options`, `check_params`, `drift_refusal`, `base_refusal`, `resume_refusal`,
`client_dp_refusal`).

The base does the rest through pieces that know no strategy: the roster (identities, declared
counts, ranks, sampling; roster.py), reply screening (screening.py), the server's drift
correction (server optimiser and SCAFFOLD's c; server_drift.py), the ledger watch
(privacy_watch.py), the measured DP noise (update_noise.py) and client-level DP's clipping and
noise (client_dp.py). `state_dict` and
`load_state_dict` gather their state for a resumed server; methods extend both with their own.
"""

from __future__ import annotations

import inspect
import json
import time
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedpeft import lowrank
from fedpeft.canary_clients import CanaryClients
from fedpeft.protocol import ARRAYS_KEY, CONFIG_KEY, NUM_REPLIES, SERVER_ROUND, TASK_KEY, TRAIN_LOSS
from fedpeft.records import TensorSpec, record_bytes, to_record
from fedpeft.search_space import LEARNING_RATE, SearchSpace
from fedpeft.strategies import update_noise
from fedpeft.strategies.client_dp import ClientLevelDP
from fedpeft.strategies.privacy_watch import PrivacyWatch
from fedpeft.strategies.ranks import check_ranks, check_scaling
from fedpeft.strategies.roster import Roster
from fedpeft.strategies.round_stats import RoundStats
from fedpeft.strategies.screening import (
    Accepted,
    ReplyRules,
    RoundReplies,
    record_failure,
    screen_replies,
)
from fedpeft.strategies.server_drift import ServerDrift


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
    client_dp : ClientLevelDP or None
        Client-level DP (client_dp.py): nodes are Poisson-sampled at `fraction`, each update is
        clipped, their sum noised and divided by the expected cohort; None: off.
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
    #: what `fedpeft compare tune=` searches for this method (fedpeft/search_space.py): its
    #: learning rate by default; a method adds what its paper tunes
    search_space: ClassVar[SearchSpace] = LEARNING_RATE
    #: whether the server step is a sum of the replied tensors followed by post-processing, so
    #: that client-level DP composes with it (client_dp.py); `client_dp_note` says why not
    sums_replies: ClassVar[bool] = False
    client_dp_note: ClassVar[str] = (
        "its aggregate is not a sum of the clients' tensors, so there is no sum to clip and noise"
    )

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
        client_dp: ClientLevelDP | None = None,
    ) -> None:
        self.global_adapter = {k: v.detach().clone().float() for k, v in global_adapter.items()}
        self.task = dict(task)
        self.train_head = train_head
        self.fraction = fraction
        self.min_clients = min_clients
        self.wait_timeout = wait_timeout
        self.rules = ReplyRules(
            max_num_examples=max_num_examples,
            median_multiple=median_multiple,
            norm_bound=norm_bound,
            private_run=bool((self.task.get("dp") or {}).get("enabled")),
        )
        self.roster = Roster(seed, track_versions=self.version_metric is not None)
        self.privacy = PrivacyWatch()
        self.stats = RoundStats()
        self.server_round = 0
        self.awaited = RoundReplies()
        self.num_clients = num_clients
        if server_opt is not None and server_opt.get("name", "none") != "none":
            self._refuse("server_opt", server_opt["name"])
        if scaffold:
            self._refuse("scaffold", "true")
        controls = {k: self.global_adapter[k] for k in self.up_keys()} if scaffold else None
        self.drift = ServerDrift(server_opt, controls)
        if client_dp is not None and (reason := self.client_dp_refusal({})) is not None:
            raise ValueError(f"client_dp.enabled=true with {self.method()}: {reason}")
        self.client_dp = client_dp

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
    def client_dp_refusal(cls, params: Mapping[str, Any]) -> str | None:
        """Why client-level DP cannot wrap this method with strategy.params `params`, or None."""
        return None if cls.sums_replies else cls.client_dp_note

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

    def round_task_json(self, server_round: int) -> str:
        """The round's task as its messages carry it (federation.build_task validated the run's)."""
        return json.dumps({**self.task, **self.round_instructions(server_round)})

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
    #: fedpeft/identity.py). Until then it is sampled under the roster's `expected_names`.
    identify_sampled_timeout: float | None = None
    #: A simulated audit's canary clients, joined to every round's aggregation (`fedpeft audit
    #: canary_clients=k`); None in every other run.
    canary_clients: CanaryClients | None = None

    def identify(
        self, identities: Mapping[int, int], declared: Mapping[int, int] | None = None
    ) -> None:
        """Learn node id -> stable identity and declared example count (Roster.identify)."""
        self.roster.identify(identities, declared)

    def member(self, node_id: int) -> int:
        """The node's stable identity when known, else its node id."""
        return self.roster.member(node_id)

    def assign_rank(self, node_id: int, ranks: Sequence[int]) -> int:
        """ranks[i % n] for the i-th client first sampled, kept for the run and across resumes."""
        return self.roster.assign_rank(node_id, ranks)

    def known_version(self, node_id: int) -> int:
        """The version of the per-node state this node reported holding (0: none)."""
        return self.roster.versions.get(node_id, 0)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able state) a resumed server needs; methods extend both."""
        tensors, drift_meta = self.drift.state_dict()
        tensors.update({f"global.{k}": v for k, v in self.global_adapter.items()})
        meta = {
            "server_round": self.server_round,
            **self.roster.state(),
            "privacy": self.privacy.state(),
            **drift_meta,
        }
        if self.client_dp is not None:
            dp_tensors, dp_meta = self.client_dp.state_dict()
            tensors.update(dp_tensors)
            meta.update(dp_meta)
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
        self.roster.load(meta)
        self.privacy = PrivacyWatch.from_state(meta.get("privacy"))
        self.drift.load_state_dict(tensors, meta)
        if self.client_dp is not None:
            self.client_dp.load_state_dict(tensors, meta)

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
            self.drift.server_opt.name if self.drift.server_opt is not None else "none",
            self.drift.scaffold,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled node with exactly the tensors that node must load."""
        self.stats = RoundStats()
        self.server_round = server_round
        task = self.round_task_json(server_round)
        sampled = self.roster.sample(
            grid,
            fraction=self.fraction,
            min_clients=self.min_clients,
            wait_timeout=self.wait_timeout,
            server_round=server_round,
            identify_timeout=self.identify_sampled_timeout,
            task=self.task,
            poisson=self.client_dp is not None,
        )
        messages = []
        for node_id in sampled:
            extra, node_config = self.node_payload(node_id)
            payload = to_record(
                {
                    **{k: self.global_adapter[k] for k in self.down_keys(node_id)},
                    **extra,
                    **self.drift.payload(),
                }
            )
            self.stats.bytes_down += record_bytes(payload)
            content = RecordDict(
                {
                    ARRAYS_KEY: payload,
                    CONFIG_KEY: ConfigRecord(
                        {**config, **node_config, SERVER_ROUND: server_round, TASK_KEY: task}
                    ),
                }
            )
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        self.stats.sampled = len(messages)
        self.awaited = RoundReplies([m.metadata.dst_node_id for m in messages], messages)
        return messages

    def reply_specs(self, node_id: int, metrics: Mapping[str, Any]) -> dict[str, TensorSpec]:
        """The tensors this node's reply must hold, given its metrics (default: `up_specs`)."""
        return self.up_specs(node_id)

    def accept(self, accepted: Sequence[Accepted]) -> None:
        """Learn from the round's accepted replies before they are aggregated (methods extend)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply (screening.py), aggregate the accepted ones, step the drift parts.

        Per-client records are keyed by identity; a sampled node that sent no reply counts as
        failed.
        """
        self.server_round = server_round
        accepted = screen_replies(
            server_round,
            replies,
            self.awaited,
            rules=self.rules,
            specs=self.reply_specs,
            control_specs=self.drift.specs(),
            roster=self.roster,
            privacy=self.privacy,
            stats=self.stats,
            version_metric=self.version_metric,
        )
        self.awaited = RoundReplies()
        self.accept(accepted)
        if self.client_dp is not None:
            return self._aggregate_client_dp(accepted)
        if len(accepted) < self.min_clients:
            log(
                WARNING,
                "round %d: %d valid replies < min_clients=%d; global adapter unchanged",
                server_round,
                len(accepted),
                self.min_clients,
            )
            return None, None
        started = time.perf_counter()
        updates = [a.tensors for a in accepted]
        weights = [a.weight for a in accepted]
        p = lowrank.normalize_weights(weights)
        self._measure_noise(accepted, p)
        previous = self.drift.before(self.global_adapter, self.server_opt_keys())
        if self.canary_clients is None:
            self.aggregate_updates(updates, p)
        else:  # a simulated audit's canary clients join the round (canary_clients.py)
            self.aggregate_updates(
                *self.canary_clients.join(server_round, self.global_adapter, updates, weights)
            )
        population = self.num_clients or self.roster.connected or len(accepted)
        controls = [a.controls for a in accepted]
        self.drift.step(self.global_adapter, previous, controls, p, population)
        self.stats.aggregate_s = time.perf_counter() - started
        losses = [self.stats.client_loss.get(a.member) for a in accepted]
        if None not in losses:
            self.stats.train_loss = float(
                sum(pk * lk for pk, lk in zip(p.tolist(), losses, strict=True))
            )
        metrics = {NUM_REPLIES: len(accepted)}
        if self.stats.train_loss is not None:
            metrics = {TRAIN_LOSS: self.stats.train_loss, **metrics}
        return self.global_record(), MetricRecord(metrics)

    def _aggregate_client_dp(
        self, accepted: Sequence[Accepted]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Fold `global + noisy mean update` in as the round's one reply (client_dp.py).

        Every round releases, whatever replied (no replies: noise alone), since the accountant
        counts every round. Nothing clients report about their data (losses, CPU time, the
        update's norm) reaches the history: only the noised tensors are released. A simulated
        audit's canary clients join the clipped sum like any client.
        """
        assert self.client_dp is not None
        started = time.perf_counter()
        keys = self.up_keys()
        start = {k: self.global_adapter[k] for k in keys}
        replies = [{k: a.tensors[k] for k in keys} for a in accepted]
        if self.canary_clients is not None:  # `fedpeft audit canary_clients=k`
            weights = [a.weight for a in accepted]
            replies, _ = self.canary_clients.join(self.server_round, start, replies, weights)
        updates = [{k: r[k].float() - start[k] for k in keys} for r in replies]
        mean = self.client_dp.noisy_mean(updates, {k: start[k].shape for k in keys})
        return self._fold_client_dp(start, mean, len(accepted), started)

    def aggregate_secure_sum(
        self,
        server_round: int,
        clipped_sum: Mapping[str, torch.Tensor] | None,
        unclipped: float,
        replied: int,
        failed: Mapping[int, str],
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Release `global + (clipped_sum + noise) / (q N)` from a securely aggregated round.

        `clipped_sum` is the sum over the `replied` nodes of their updates under `up_keys`, each
        clipped by the node to the bound `client_dp.clip_norm` it was sent (None: the round
        halted, noise alone is released, as every round counts); `unclipped` is how many were
        within the bound. `failed` maps the sampled nodes without a masked vector to a reason.
        The noise, the adaptive bound and the fold are client-level DP's own (client_dp.py).
        """
        if self.client_dp is None:
            raise ValueError("secure aggregation releases client-level DP's noisy sum: enable it")
        self.server_round = server_round
        self.awaited = RoundReplies()
        for node, reason in failed.items():
            record_failure(self.stats, self.roster, node, reason, server_round)
        self.stats.replied = replied
        started = time.perf_counter()
        keys = self.up_keys()
        start = {k: self.global_adapter[k] for k in keys}
        shapes = {k: start[k].shape for k in keys}
        if clipped_sum is None:
            flat = torch.zeros(sum(v.numel() for v in start.values()), dtype=torch.float64)
        else:
            flat = torch.cat([clipped_sum[k].reshape(-1).double() for k in keys])
        mean = self.client_dp.release_sum(flat, unclipped, replied, shapes)
        return self._fold_client_dp(start, mean, replied, started)

    def _fold_client_dp(
        self,
        start: Mapping[str, torch.Tensor],
        mean: Mapping[str, torch.Tensor],
        replied: int,
        started: float,
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Fold `start + mean` in as the round's one reply, then step the drift parts."""
        assert self.client_dp is not None
        keys = list(start)
        reply = {k: start[k] + mean[k] for k in keys}
        one = torch.ones(1)
        previous = self.drift.before(self.global_adapter, self.server_opt_keys())
        self.aggregate_updates([reply], one)
        population = self.num_clients or self.roster.connected or 1
        self.drift.step(self.global_adapter, previous, [], one, population)
        self.stats.aggregate_s = time.perf_counter() - started
        self.stats.client_loss, self.stats.client_seconds = {}, None
        self.stats.client_dp = self.client_dp.last
        return self.global_record(), MetricRecord({NUM_REPLIES: replied})

    def _measure_noise(self, accepted: Sequence[Accepted], p: torch.Tensor) -> None:
        """Record the round's ||Delta|| and, for private SGD replies, its expected noise norm."""
        before = {k: self.global_adapter[k] for k in self.up_keys() if k in self.global_adapter}
        norms = update_noise.round_norms(
            self.task,
            before,
            [a.tensors for a in accepted],
            p,
            [a.metrics for a in accepted],
            set(self.head_keys()),
        )
        if norms is not None:
            self.stats.update_norm, self.stats.dp_noise_norm = norms

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
