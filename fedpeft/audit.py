"""`fedpeft audit`: a one-run privacy audit, an empirical lower bound on epsilon beside the ledger.

The ledger says what the privacy would be if clipping and noise were applied as assumed; the audit
checks the trained model. m canaries (data/canaries.py) each enter one simulated client's data
with probability 1/2; the federation then runs as configured (Flower's simulation, the real
ClientApp, real Opacus). On the final global model each canary gets a black-box score, minus its
loss on its own random label: a canary the model fits better than chance suggests it was trained
on. Guessing "included" for the highest scores and "excluded" for the lowest, the number of right
guesses bounds epsilon from below (Steinke, Nasr and Jagielski, NeurIPS 2023;
privacy/audit_bound.py), at the run's delta and the stated confidence.

What it shows and what it cannot (docs/privacy.md): a bound above the ledger's epsilon means the
run leaked more than accounted, a bug; a bound below it is no proof of privacy, since one run with
black-box scores is a weak attacker and canaries are only one kind of example.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.data.canaries import CanarySet
from fedpeft.errors import ConfigError
from fedpeft.federation import Federation
from fedpeft.privacy.audit_bound import AuditBound, best_guess_bound
from fedpeft.privacy.settings import default_delta
from fedpeft.tasks import collate

#: audit options given beside the run's overrides, with their defaults
OPTIONS = {"canaries": 1000, "canary_seed": 0, "confidence": 0.95}
#: delta at which a non-private run's bound is reported (for scale; it claims no epsilon)
NON_PRIVATE_DELTA = 1e-5


def split_options(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(the run's Hydra overrides, the audit's options) from `fedpeft audit` arguments."""
    overrides, options = [], dict(OPTIONS)
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in OPTIONS:
            overrides.append(arg)
            continue
        try:
            options[key] = type(OPTIONS[key])(value)
        except ValueError:
            raise ConfigError(f"{arg}: {key} must be a {type(OPTIONS[key]).__name__}") from None
    if not 2 <= options["canaries"] <= 100_000:
        raise ConfigError(f"canaries={options['canaries']} must be in [2, 100000], e.g. 1000")
    if not 0 < options["confidence"] < 1:
        raise ConfigError(f"confidence={options['confidence']} must be in (0, 1), e.g. 0.95")
    return overrides, options


def insert_canaries(fed: Federation, canaries: CanarySet) -> None:
    """Put the canaries into the run's task, so every simulated client adds the ones it holds."""
    if fed.task["task"] != "classification":
        raise ConfigError(
            "fedpeft audit builds canaries for classification tasks: use a classification "
            "dataset (sst2, trec, banking77, spamassassin)"
        )
    fed.task["canaries"] = canaries.to_dict()
    fed.strategy.task["canaries"] = canaries.to_dict()
    cap = fed.strategy.rules.max_num_examples
    if cap is not None:  # a client's count now includes the canaries it holds
        fed.strategy.rules = replace(fed.strategy.rules, max_num_examples=cap + canaries.count)


@torch.no_grad()
def canary_scores(fed: Federation, examples: Sequence[dict], batch_size: int = 64) -> np.ndarray:
    """(m,) float64: minus each canary's loss on its label under the final global model."""
    runtime = fed.evaluator.runtime
    runtime.reset(fed.strategy.global_adapter, fed.evaluator.base_stacks())
    runtime.model.eval()
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start : start + batch_size]), runtime.tokenizer.pad_token_id)
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        logits = runtime.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        scores.append(-loss.double().cpu())
    return torch.cat(scores).numpy()


def run_delta(fed: Federation) -> float:
    """The largest delta any client runs at (the weakest claim), or the nominal one without DP."""
    dp = fed.task["dp"]
    if not dp["enabled"]:
        return NON_PRIVATE_DELTA
    if dp["delta"] is not None:
        return float(dp["delta"])
    return default_delta(min(fed.partition_sizes))


def audit_federation(
    fed: Federation, canaries: CanarySet, accounted: float | None, confidence: float
) -> dict[str, Any]:
    """Score the canaries on `fed`'s final model and bound epsilon; the audit's record."""
    examples = canaries.examples(fed.evaluator.runtime.tokenizer, int(fed.task["num_labels"]))
    scores = canary_scores(fed, examples)
    included = canaries.included()
    delta = run_delta(fed)
    bound: AuditBound = best_guess_bound(scores, included, delta, confidence)
    return {
        "audited_epsilon_lower_bound": bound.epsilon,
        "accounted_epsilon": accounted,
        "private": bool(fed.task["dp"]["enabled"]),
        "delta": delta,
        "confidence": confidence,
        "canaries": canaries.count,
        "canaries_included": int(included.sum()),
        "guesses": bound.guesses,
        "correct": bound.correct,
        "k_plus": bound.k_plus,
        "k_minus": bound.k_minus,
        "candidates": bound.candidates,
        "score_included_mean": float(scores[included].mean()),
        "score_excluded_mean": float(scores[~included].mean()),
        "estimator": "Steinke, Nasr and Jagielski (NeurIPS 2023), one-run audit, "
        "black-box loss scores, union bound over the guess counts tried",
        "bound": asdict(bound),
    }


def write_audit(run_dir: Path, record: dict[str, Any]) -> None:
    """audit.json in the run folder, and the bound beside max_epsilon in summary.json."""
    (run_dir / "audit.json").write_text(json.dumps(record, indent=2) + "\n")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["audited_epsilon_lower_bound"] = record["audited_epsilon_lower_bound"]
    summary["audit"] = {k: v for k, v in record.items() if k != "bound"}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


def verdict(record: dict[str, Any]) -> str | None:
    """Why the audit fails (its bound exceeds the ledger's epsilon), or None."""
    accounted, bound = record["accounted_epsilon"], record["audited_epsilon_lower_bound"]
    if record["private"] and accounted is not None and bound > accounted:
        return (
            f"the audited lower bound on epsilon, {bound:.3f} at delta {record['delta']:.1e} "
            f"({record['confidence']:.0%} confidence), exceeds the ledger's epsilon "
            f"{accounted:.3f}: this run leaked more than it accounted for"
        )
    return None


def audit(args: Sequence[str], simulate: Callable[..., dict]) -> dict[str, Any]:
    """Run the federation of `args` with canaries in `simulate`, audit it, write the record.

    The caller fails the command when `verdict` gives a reason.
    """
    overrides, options = split_options(args)
    canaries = CanarySet(options["canaries"], options["canary_seed"])
    prepared: dict[str, Federation] = {}

    def with_canaries(fed: Federation) -> None:
        insert_canaries(fed, canaries)
        prepared["fed"] = fed

    result = simulate(overrides, on_prepared=with_canaries)
    record = audit_federation(
        prepared["fed"], canaries, result.get("max_epsilon"), options["confidence"]
    )
    write_audit(Path(result["run_dir"]), record)
    return record
