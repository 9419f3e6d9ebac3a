"""What the server prepares for one run: data, the clients' task, strategy and evaluator."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedpeft import data, training
from fedpeft.errors import ConfigError
from fedpeft.runtime import ModelRuntime, model_runtime
from fedpeft.strategies import STRATEGIES, LowRankStrategy


def build_task(cfg: DictConfig, num_labels: int) -> dict[str, Any]:
    """The JSON-able instructions every client needs to rebuild model, adapter and data."""
    strategy_cls = STRATEGIES[cfg.strategy.name]
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    train_head = (
        cfg.adapter.train_head if cfg.strategy.train_head is None else cfg.strategy.train_head
    )
    return {
        "model": plain["model"],
        "dataset": plain["dataset"],
        "partition": plain["partition"],
        "num_labels": num_labels,
        "seed": cfg.seed,
        "adapter_seed": cfg.adapter.init_seed,
        "device": cfg.device,
        "adapter": {
            "kind": strategy_cls.kind,
            "rank": cfg.adapter.rank,
            "alpha": cfg.strategy.alpha or cfg.adapter.alpha,
            "target_modules": list(cfg.adapter.target_modules),
            "train_head": bool(train_head),
            "dropout": cfg.adapter.dropout,
        },
        "train": {
            **plain["train"],
            "lr": cfg.strategy.lr or cfg.train.lr,
            "local_steps": cfg.federation.local_steps,
            "local_epochs": cfg.federation.local_epochs,
        },
    }


def strategy_params(cfg: DictConfig) -> dict[str, Any]:
    """The method's own options (strategy.params), checked against its constructor."""
    raw = cfg.strategy.get("params")
    params = {} if raw is None else dict(OmegaConf.to_container(raw, resolve=True))
    allowed = set(inspect.signature(STRATEGIES[cfg.strategy.name].__init__).parameters)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"strategy.params.{unknown[0]} is not an option of {cfg.strategy.name}")
    return params


class ServerEvaluator:
    """Evaluates a global adapter on the server's held-out split, with the clients' runtime."""

    def __init__(
        self, runtime: ModelRuntime, examples: list[dict], batch_size: int, num_labels: int
    ):
        self.runtime = runtime
        self.examples = examples
        self.batch_size = batch_size
        self.num_labels = num_labels

    def __call__(self, global_adapter: dict[str, torch.Tensor]) -> dict[str, float]:
        """Accuracy, loss and macro-F1 of the global adapter."""
        self.runtime.reset(global_adapter)
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

    def save_adapter(self, path: Path) -> None:
        """Save the global adapter in peft's format, for PeftModel.from_pretrained."""
        self.evaluator.runtime.reset(self.strategy.global_adapter)
        self.evaluator.runtime.model.save_pretrained(str(path))


def prepare(cfg: DictConfig) -> Federation:
    """Load data and model and build the strategy; every bad input fails here, before any round."""
    dataset = data.load_text_dataset(cfg.dataset, seed=cfg.seed)
    num_clients = cfg.federation.num_clients
    if num_clients > len(dataset.train):
        raise ConfigError(
            f"federation.num_clients={num_clients} exceeds the {len(dataset.train)} training "
            "examples: use fewer clients or a larger dataset"
        )
    sizes = data.partition_sizes(dataset.train, num_clients, cfg.partition, seed=cfg.seed)
    task = build_task(cfg, dataset.num_labels)
    runtime = model_runtime(task)
    test = dataset.test
    if cfg.eval.max_examples is not None and cfg.eval.max_examples < len(test):
        test = test.shuffle(seed=cfg.seed).select(range(cfg.eval.max_examples))
    examples = list(data.tokenize(test, runtime.tokenizer, cfg.train.max_length))
    evaluator = ServerEvaluator(runtime, examples, cfg.eval.batch_size, dataset.num_labels)
    try:
        strategy = STRATEGIES[cfg.strategy.name](
            runtime.initial,
            task,
            train_head=task["adapter"]["train_head"],
            fraction=cfg.federation.fraction,
            min_clients=cfg.federation.min_clients,
            seed=cfg.seed,
            max_num_examples=max(sizes),
            **strategy_params(cfg),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return Federation(cfg, dataset, task, strategy, evaluator, sizes)
