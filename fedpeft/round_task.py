"""The round task: the typed, validated instructions every client needs to rebuild the same run.

The server builds it from the run's config (federation.build_task), validates it and sends it as
JSON in each train message's config (protocol.TASK_KEY); a node parses that JSON back into a
`RoundTask` before anything reads it (clients/task_guard.py adds the node's own caps and pins).
Both directions go through `from_dict`, so the server cannot send what a node would refuse.

Typed sections: `train` (training.TrainSettings), `adapter` (adapters.AdapterSpec), `dp`
(privacy.DPSettings) and `client_opt` (`DriftSettings`). The data and model sections stay
JSON objects that their own layers read (`model` is checked by models.ModelSpec.from_config,
`dataset` and `partition` by data/), so that a data set's options are not listed twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from fedpeft.adapters import AdapterSpec
from fedpeft.data.canaries import KINDS as CANARY_KINDS
from fedpeft.data.canaries import MAX_CANARIES, CanarySet
from fedpeft.models import TASKS, ModelSpec
from fedpeft.privacy.settings import DPSettings
from fedpeft.schema import check_fields, finite_number, integer_in, known_keys, mapping
from fedpeft.training import TrainSettings

_SEED_RANGE = (0, 2**63 - 1)


@dataclass(frozen=True)
class DriftSettings:
    """The task's `client_opt`: FedProx's mu (0: off) and whether SCAFFOLD is on."""

    proximal_mu: float = 0.0
    scaffold: bool = False

    @classmethod
    def parse(cls, raw: object, where: str = "client_opt") -> DriftSettings:
        """Validate a `client_opt` mapping (absent keys: off)."""
        values = mapping(raw, where)
        known_keys(values, where, ("proximal_mu", "scaffold"))
        mu, scaffold = values.get("proximal_mu") or 0.0, values.get("scaffold", False)
        check_fields(
            where,
            {"proximal_mu": mu, "scaffold": scaffold},
            [
                ("proximal_mu", finite_number(mu) and mu >= 0, "a finite number >= 0"),
                ("scaffold", isinstance(scaffold, bool), "true or false"),
            ],
        )
        return cls(float(mu), scaffold)

    @property
    def enabled(self) -> bool:
        """Whether any correction applies."""
        return self.proximal_mu > 0 or self.scaffold


def _adapter(raw: object) -> AdapterSpec:
    values = mapping(raw, "adapter")
    names = [f.name for f in fields(AdapterSpec)]
    known_keys(values, "adapter", names, required=names)
    modules = values["target_modules"]
    check_fields(
        "adapter",
        values,
        [
            ("kind", isinstance(values["kind"], str), "an adapter kind"),
            ("rank", integer_in(values["rank"], 1, 2**31), "an integer >= 1"),
            ("alpha", finite_number(values["alpha"]) and values["alpha"] > 0, "a positive number"),
            (
                "target_modules",
                isinstance(modules, list | tuple) and all(isinstance(m, str) for m in modules),
                "a list of module names",
            ),
            ("train_head", isinstance(values["train_head"], bool), "true or false"),
            (
                "dropout",
                finite_number(values["dropout"]) and 0 <= values["dropout"] < 1,
                "a number in [0, 1)",
            ),
        ],
    )
    return AdapterSpec(
        kind=values["kind"],
        rank=values["rank"],
        alpha=float(values["alpha"]),
        target_modules=tuple(modules),
        train_head=values["train_head"],
        dropout=float(values["dropout"]),
    )


def _canaries(raw: object) -> CanarySet | None:
    if raw is None:
        return None
    values = mapping(raw, "canaries")
    known_keys(values, "canaries", ("count", "seed", "length", "kind"), required=("count", "seed"))
    check_fields(
        "canaries",
        values,
        [
            ("count", integer_in(values["count"], 1, MAX_CANARIES), f"in [1, {MAX_CANARIES}]"),
            ("seed", integer_in(values["seed"], *_SEED_RANGE), "an integer >= 0"),
            ("length", integer_in(values.get("length", 16), 1, 512), "in [1, 512]"),
            ("kind", values.get("kind", "input") in CANARY_KINDS, f"one of {CANARY_KINDS}"),
        ],
    )
    return CanarySet(
        values["count"], values["seed"], values.get("length", 16), values.get("kind", "input")
    )


def adapter_dict(spec: AdapterSpec) -> dict[str, Any]:
    """The task's JSON `adapter` section for `spec`."""
    return {
        "kind": spec.kind,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "target_modules": list(spec.target_modules),
        "train_head": spec.train_head,
        "dropout": spec.dropout,
    }


@dataclass(frozen=True)
class RoundTask:
    """What every client of a round needs: model, adapter, data, training, privacy, drift."""

    #: "classification" or "causal_lm"
    task: str
    model: Mapping[str, Any]
    dataset: Mapping[str, Any]
    partition: Mapping[str, Any]
    num_labels: int
    label_names: tuple[str, ...]
    seed: int
    adapter_seed: int
    device: str | None
    faults: Mapping[str, Any]
    adapter: AdapterSpec
    dp: DPSettings
    client_opt: DriftSettings
    train: TrainSettings
    #: FFA-LoRA: A comes from `adapter_seed` on every party, never from the payload
    a_from_seed: bool = False
    #: a privacy audit's canaries, added to the simulated clients' data (`fedpeft audit`)
    canaries: CanarySet | None = None

    #: keys a task must hold (and may hold: `a_from_seed`)
    REQUIRED = (
        "task", "model", "dataset", "partition", "num_labels", "label_names", "seed",
        "adapter_seed", "device", "faults", "adapter", "dp", "client_opt", "train",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, raw: object) -> RoundTask:
        """Validate a task mapping; unknown keys, wrong types and bad values are ConfigErrors."""
        values = mapping(raw, "the task")
        optional = ("a_from_seed", "canaries")
        known_keys(values, "the task", (*cls.REQUIRED, *optional), required=cls.REQUIRED)
        labels, a_from_seed = values["label_names"], values.get("a_from_seed", False)
        seeds = ("seed", "adapter_seed")
        check_fields(
            "task",
            values,
            [
                ("task", values["task"] in TASKS, f"one of {', '.join(TASKS)}"),
                ("num_labels", integer_in(values["num_labels"], 0, 2**31), "an integer >= 0"),
                (
                    "label_names",
                    isinstance(labels, list) and all(isinstance(x, str) for x in labels),
                    "a list of strings",
                ),
                *((s, integer_in(values[s], *_SEED_RANGE), "an integer >= 0") for s in seeds),
                ("device", values["device"] is None or isinstance(values["device"], str), "a name"),
                ("a_from_seed", isinstance(a_from_seed, bool), "true or false"),
            ],
        )
        for section in ("model", "dataset", "partition", "faults"):
            mapping(values[section], section)
        ModelSpec.from_config(values["model"], values["num_labels"], values["task"])
        return cls(
            task=values["task"],
            model=values["model"],
            dataset=values["dataset"],
            partition=values["partition"],
            num_labels=values["num_labels"],
            label_names=tuple(labels),
            seed=values["seed"],
            adapter_seed=values["adapter_seed"],
            device=values["device"],
            faults=values["faults"],
            adapter=_adapter(values["adapter"]),
            dp=DPSettings.parse(values["dp"], "dp"),
            client_opt=DriftSettings.parse(values["client_opt"]),
            train=TrainSettings.parse(values["train"]),
            a_from_seed=a_from_seed,
            canaries=_canaries(values.get("canaries")),
        )

    @classmethod
    def from_json(cls, text: str) -> RoundTask:
        """Parse the JSON a train message carries (strictness of the JSON itself: task_guard)."""
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able mapping `from_dict` reads (what the wire carries)."""
        out = {
            "task": self.task,
            "model": dict(self.model),
            "dataset": dict(self.dataset),
            "partition": dict(self.partition),
            "num_labels": self.num_labels,
            "label_names": list(self.label_names),
            "seed": self.seed,
            "adapter_seed": self.adapter_seed,
            "device": self.device,
            "faults": dict(self.faults),
            "adapter": adapter_dict(self.adapter),
            "dp": asdict(self.dp),
            "client_opt": asdict(self.client_opt),
            "train": self.train.to_dict(),
        }
        if self.a_from_seed:
            out["a_from_seed"] = True
        if self.canaries is not None:
            out["canaries"] = self.canaries.to_dict()
        return out

    def to_json(self) -> str:
        """The task as the JSON a train message carries."""
        return json.dumps(self.to_dict())

    def with_adapter(self, rank: int, alpha: float) -> RoundTask:
        """The task with this node's own rank and alpha (per-client ranks, self-pruning)."""
        return replace(self, adapter=replace(self.adapter, rank=int(rank), alpha=float(alpha)))
