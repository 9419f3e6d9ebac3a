"""What the server prepares for one run: data, the clients' task, strategy and evaluator."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedpeft import adapters, data, models, privacy, tasks, training
from fedpeft.causal import evaluation as causal_evaluation
from fedpeft.client_pool import federation_pool_size
from fedpeft.errors import ConfigError
from fedpeft.privacy.client_level import ClientDPSettings, ClientNoise
from fedpeft.round_task import RoundTask
from fedpeft.runtime import ModelRuntime, adapter_spec, model_runtime, model_spec
from fedpeft.strategies import STRATEGIES, LowRankStrategy
from fedpeft.strategies.client_dp import ClientLevelDP

logger = logging.getLogger(__name__)


def build_task(
    cfg: DictConfig, num_labels: int, label_names: list[str] | None = None
) -> dict[str, Any]:
    """The JSON-able instructions every client needs to rebuild model, adapter and data.

    `label_names` lets a node that trains on its own file map its labels onto the server's. The
    task is validated as a node will validate it (round_task.RoundTask), so a config that
    would make every node refuse its round fails here, before the run starts; the dict returned is
    the task's canonical form, the one a node rebuilds (so both share one cached runtime).
    """
    strategy_cls = STRATEGIES[cfg.strategy.name]
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    task = {
        "task": cfg.task,
        "model": {**plain["model"], "task": cfg.task},
        "dataset": plain["dataset"],
        "partition": plain["partition"],
        "num_labels": num_labels,
        "label_names": list(label_names or []),
        "seed": cfg.seed,
        "adapter_seed": cfg.adapter.init_seed,
        "device": cfg.device,
        "faults": {**plain["faults"], "round_timeout": cfg.federation.round_timeout},
        "adapter": {
            "kind": strategy_cls.kind,
            "rank": cfg.adapter.rank,
            "alpha": cfg.adapter.alpha,
            "target_modules": list(cfg.adapter.target_modules),
            "train_head": bool(cfg.adapter.train_head),
            "dropout": cfg.adapter.dropout,
        },
        "dp": dp_task(cfg),
        "client_opt": plain.get("client_opt") or {},
        "train": {
            **plain["train"],
            "local_steps": cfg.federation.local_steps,
            "local_epochs": cfg.federation.local_epochs,
        },
    }
    return RoundTask.from_dict(task).to_dict()  # as every node will read it: refused here first


def dp_task(cfg: DictConfig) -> dict[str, Any]:
    """The `dp` group as clients need it, with the rounds each client is planned to train in."""
    plain = OmegaConf.to_container(cfg.dp, resolve=True)
    assert isinstance(plain, dict)
    if not plain.get("enabled"):
        return {"enabled": False}
    fed = cfg.federation
    planned = plain.get("planned_rounds") or privacy.planned_rounds(
        fed.rounds, fed.num_clients, fed.fraction, fed.min_clients
    )
    return {**plain, "planned_rounds": int(planned)}


def strategy_params(cfg: DictConfig, sizes: Sequence[int] = ()) -> dict[str, Any]:
    """The method's own options (strategy.params), checked, plus what the run derives for them.

    A method that takes `total_steps` (Fed-SB's calibration step) gets the optimizer steps the
    federation is planned to take, all clients together: rounds x clients per round x local
    steps (with local_epochs: each client's batches per epoch, from the partition `sizes`).
    """
    raw = cfg.strategy.get("params")
    params = {} if raw is None else dict(OmegaConf.to_container(raw, resolve=True))
    allowed = STRATEGIES[cfg.strategy.name].options()  # unknown keys: refused by compose_config
    if "total_steps" in allowed and params.get("total_steps") is None:
        params["total_steps"] = planned_steps(cfg, sizes)
    return params


def client_level_dp(cfg: DictConfig) -> ClientLevelDP | None:
    """The server's client-level DP mechanism, calibrated for this run (None when off).

    The population is federation.num_clients, each Poisson-sampled at federation.fraction, over
    federation.rounds rounds.
    """
    settings = ClientDPSettings.parse(plain_group(cfg, "client_dp") or {}, "client_dp")
    if not settings.enabled:
        return None
    noise = ClientNoise.calibrate(
        settings,
        population=cfg.federation.num_clients,
        sample_rate=float(cfg.federation.fraction),
        rounds=cfg.federation.rounds,
    )
    return ClientLevelDP(settings, noise, seed=cfg.seed)


def plain_group(cfg: DictConfig, group: str) -> dict[str, Any] | None:
    """A root config group as a plain dict (None when the config has none)."""
    raw = cfg.get(group)
    return None if raw is None else dict(OmegaConf.to_container(raw, resolve=True))


def planned_steps(cfg: DictConfig, sizes: Sequence[int] = ()) -> int:
    """Optimizer steps of the whole run over all clients: rounds x sampled x steps per client."""
    fed = cfg.federation
    sampled = min(fed.num_clients, max(fed.min_clients, int(fed.fraction * fed.num_clients)))
    if fed.local_epochs is None or not sizes:
        per_client = fed.local_steps or 1
    else:
        batches = [math.ceil(n / cfg.train.batch_size) for n in sizes]
        per_client = max(1, round(fed.local_epochs * sum(batches) / len(batches)))
    return int(fed.rounds * sampled * per_client)


class ServerEvaluator:
    """Evaluates a global adapter on the server's held-out split, with the clients' runtime.

    `base_stacks` gives the stacked modules merged into the base so far (FLoRA): the evaluator
    merges them into its own pristine base before every evaluation, as every client does.
    For `task="causal_lm"` the scores are exact match (as accuracy), loss and perplexity.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        examples: list[dict],
        batch_size: int,
        num_labels: int,
        base_stacks: Callable[[], list[dict[str, torch.Tensor]]] = list,
        task: str = "classification",
        max_new_tokens: int = 256,
    ):
        self.task = task
        self.max_new_tokens = max_new_tokens
        self.runtime = runtime
        self.examples = examples
        self.batch_size = batch_size
        self.num_labels = num_labels
        self.base_stacks = base_stacks

    def __call__(self, global_adapter: dict[str, torch.Tensor]) -> dict[str, float]:
        """Accuracy, loss and macro-F1 of the global adapter (causal LMs: see the class)."""
        self.runtime.reset(global_adapter, self.base_stacks())
        if self.task == "causal_lm":
            return causal_evaluation.evaluate(
                self.runtime.model,
                self.runtime.tokenizer,
                self.examples,
                batch_size=self.batch_size,
                device=self.runtime.device,
                max_new_tokens=self.max_new_tokens,
            )
        return training.evaluate(
            self.runtime.model,
            self.examples,
            batch_size=self.batch_size,
            pad_token_id=self.runtime.tokenizer.pad_token_id,
            device=self.runtime.device,
            num_labels=self.num_labels,
        )


@dataclass
class Federation:
    """A prepared run: its config, dataset, task, strategy and server-side evaluator."""

    cfg: DictConfig
    dataset: data.TextDataset
    task: dict[str, Any]
    strategy: LowRankStrategy
    evaluator: ServerEvaluator
    partition_sizes: list[int]
    #: Flower nodes a simulation registers (client_pool.py); num_clients: one per client
    pool_size: int

    @property
    def pooled(self) -> bool:
        """Whether fewer nodes than clients serve the simulation (client_pool.PoolGrid)."""
        return self.pool_size < len(self.partition_sizes)

    def size_summary(self) -> dict[str, int]:
        """The partitions' sizes in brief: count, min, median, max and total examples."""
        sizes = np.asarray(self.partition_sizes)
        return {
            "clients": int(sizes.size),
            "min": int(sizes.min()),
            "median": int(np.median(sizes)),
            "max": int(sizes.max()),
            "total": int(sizes.sum()),
        }

    def save_adapter(self, path: Path) -> None:
        """Save the global model as a plain peft LoRA, for PeftModel.from_pretrained.

        Methods whose global model is not a plain LoRA on the pristine base (Fed-SB's B R A,
        FLoRA's merged base) export one of scaling 1 (`export_lora`); it is written into a freshly
        built plain LoRA model of that rank (alpha = rank) and saved from there.
        """
        if self.strategy.evaluation == "personalised":
            save_shared(self.strategy, path)
            return
        export = self.strategy.export_lora()
        if export is None:
            self.evaluator.runtime.reset(self.strategy.global_adapter)
            self.evaluator.runtime.model.save_pretrained(str(path))
            return
        tensors, rank = export
        spec = adapter_spec(self.task)
        plain = adapters.AdapterSpec(
            "lora", rank, float(rank), spec.target_modules, spec.train_head, spec.dropout
        )
        base = models.load_model(model_spec(self.task), seed=int(self.task["adapter_seed"]))
        model = adapters.inject(base, plain)
        adapters.write_adapter(model, tensors)
        model.save_pretrained(str(path))


def save_shared(strategy: LowRankStrategy, path: Path) -> None:
    """A method without a global model (FedSA-LoRA) saves what the server holds, not an adapter.

    `shared_lora_A.safetensors` under canonical keys (adapters.py); each client's own factors
    stay on the client, so no peft adapter is written (the first save says so in the log).
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    target = path / SHARED_FILE
    if not target.exists():
        logger.info(
            "%s has no global adapter (each client keeps its own factors): saving the shared "
            "factors only, to %s; no peft adapter is written",
            type(strategy).__name__,
            target,
        )
    save_file({k: v.contiguous() for k, v in strategy.shared_tensors().items()}, str(target))


#: the file a method without a global model saves its shared tensors in (save_shared)
SHARED_FILE = "shared_lora_A.safetensors"

#: Bytes of base-weight gradients `layer_gradients` holds at once (at least one layer's).
GRADIENT_BUDGET = 256 * 2**20


def gradient_groups(weights: Mapping[str, torch.Tensor], budget: int) -> list[list[str]]:
    """Consecutive layers whose gradients together fit `budget` bytes (a layer alone may not)."""
    groups: list[list[str]] = []
    size = 0
    for name, weight in weights.items():
        nbytes = weight.numel() * weight.element_size()
        if not groups or size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def layer_gradients(
    runtime: ModelRuntime,
    examples: list[dict],
    batch_size: int,
    budget: int = GRADIENT_BUDGET,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(layer, dLoss/dW0) for every adapted layer, a group of layers per pass over `examples`.

    Only the current group's base weights require gradients, so the extra memory is at most
    `budget` bytes of gradients (or one layer's, if larger): MiniLM's or SmolLM2's adapted layers
    all fit the default in one forward and backward pass, where one pass per layer took 60
    passes for SmolLM2. The loss is the mean over all examples; the adapter is the runtime's
    initial one.
    """
    model = runtime.model
    runtime.reset({})
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    model.eval()
    collate = functools.partial(tasks.collate, pad_token_id=runtime.tokenizer.pad_token_id)
    batches = [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    weights = adapters.base_weights(model)
    try:
        for group in gradient_groups(weights, budget):
            for name in group:
                weights[name].requires_grad_(True)
            for batch in batches:
                batch = {k: v.to(runtime.device) for k, v in batch.items()}
                loss = model(**batch).loss * (len(batch["labels"]) / len(examples))
                loss.backward()
            for name in group:
                weight = weights[name]
                grad = weight.grad.detach()
                weight.grad = None
                weight.requires_grad_(False)
                yield name, grad
    finally:
        for weight in weights.values():
            weight.grad = None
            weight.requires_grad_(False)
        for param in trainable:
            param.requires_grad_(True)


def example_bounds(cfg: DictConfig, sizes: list[int], deployed: bool) -> dict[str, Any]:
    """The strategy's bounds on claimed example counts (see `prepare`)."""
    cap = cfg.replies.max_num_examples
    if cap is not None:
        return {"max_num_examples": cap, "median_multiple": None}
    if deployed:
        return {"max_num_examples": None, "median_multiple": cfg.replies.max_median_multiple}
    return {"max_num_examples": max(sizes), "median_multiple": None}


def _warn_small_clients(task: Mapping[str, Any], sizes: Sequence[int]) -> None:
    """Log when DP calibration would give the smallest simulated client far more noise than most."""
    dp, hp = task.get("dp") or {}, task["train"]
    if not dp.get("enabled") or dp.get("noise_multiplier") is not None:
        return
    batch = int(hp["batch_size"])
    message = privacy.small_client_warning(
        sizes,
        float(dp["target_epsilon"]),
        dp.get("delta"),
        str(dp["accountant"]),
        int(dp["planned_rounds"]),
        batch,
        lambda n: training.planned_steps(n, batch, hp["local_steps"], hp["local_epochs"]),
    )
    if message is not None:
        logger.warning(message)


#: replies.norm_bound of a deployment when the config leaves it null: far above any honest
#: LoRA factor or head tensor (their Frobenius norms are of order 1 to 10), far below a poisoned
#: or overflowing one
DEPLOYED_NORM_BOUND = 100.0


def reply_norm_bound(cfg: DictConfig, deployed: bool) -> float | None:
    """The bound on every replied tensor's norm: the config's, else 100 in a deployment."""
    if cfg.replies.norm_bound is not None:
        return float(cfg.replies.norm_bound)
    return DEPLOYED_NORM_BOUND if deployed else None


def prepare(cfg: DictConfig, deployed: bool = False) -> Federation:
    """Load data and model and build the strategy; every bad input fails here, before any round.

    `deployed`: the clients bring their own data (`flwr run`), so the server's partitions say
    nothing about their sizes: without `replies.max_num_examples` their claims are bounded by
    the median of the counts they declare (strategies/declared.py), not by the largest partition.
    """
    dataset = data.load_text_dataset(cfg.dataset, seed=cfg.seed)
    num_clients = cfg.federation.num_clients
    if num_clients > len(dataset.train) and cfg.partition.name != "sampled":
        raise ConfigError(
            f"federation.num_clients={num_clients} exceeds the {len(dataset.train)} training "
            "examples: use fewer clients, a larger dataset, or sampled client data sets "
            "(partition=sampled)"
        )
    sizes = data.partition_sizes(dataset.train, num_clients, cfg.partition, seed=cfg.seed)
    task = build_task(cfg, dataset.num_labels, list(dataset.label_names))
    runtime = model_runtime(task)
    try:
        strategy = STRATEGIES[cfg.strategy.name](
            runtime.initial,
            task,
            train_head=task["adapter"]["train_head"],
            fraction=cfg.federation.fraction,
            min_clients=cfg.federation.min_clients,
            seed=cfg.seed,
            **example_bounds(cfg, sizes, deployed),
            norm_bound=reply_norm_bound(cfg, deployed),
            server_opt=plain_group(cfg, "server_opt"),
            scaffold=bool((cfg.get("client_opt") or {}).get("scaffold", False)),
            num_clients=num_clients,
            client_dp=client_level_dp(cfg),
            **strategy_params(cfg, sizes),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _warn_small_clients(task, sizes)
    test = dataset.test
    calibration = strategy.calibration_examples
    if calibration:
        # Server-held calibration data, never client data: the first examples of the shuffled
        # held-out split, removed from the evaluation set so they never count towards accuracy.
        if calibration >= len(test):
            raise ConfigError(
                f"strategy.params.calibration_examples={calibration} leaves none of the "
                f"{len(test)} held-out examples for evaluation: use fewer"
            )
        test = test.shuffle(seed=cfg.seed)
        held = tasks.encode(
            cfg.task, test.select(range(calibration)), runtime.tokenizer, cfg.train.max_length
        )
        test = test.select(range(calibration, len(test)))
        strategy.calibrate(layer_gradients(runtime, held, cfg.eval.batch_size))
    if cfg.eval.max_examples is not None and cfg.eval.max_examples < len(test):
        test = test.shuffle(seed=cfg.seed).select(range(cfg.eval.max_examples))
    examples = tasks.encode(cfg.task, test, runtime.tokenizer, cfg.train.max_length)
    evaluator = ServerEvaluator(
        runtime,
        examples,
        cfg.eval.batch_size,
        dataset.num_labels,
        strategy.base_stacks,
        task=cfg.task,
        max_new_tokens=int(cfg.eval.get("max_new_tokens") or 256),
    )
    pool = (
        num_clients
        if deployed
        else federation_pool_size(cfg.federation, strategy.client_dp is not None)
    )
    return Federation(cfg, dataset, task, strategy, evaluator, sizes, pool)
