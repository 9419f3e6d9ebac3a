"""`fedpeft audit`: a one-run privacy audit, an empirical lower bound on epsilon beside the ledger.

The ledger says what the privacy would be if clipping and noise were applied as assumed; the audit
checks the trained model. m canaries (data/canaries.py) each enter one simulated client's
training with probability 1/2; the federation then runs as configured (Flower's simulation, the
real ClientApp, real Opacus). Each canary gets a score from the final global model:
- gradient canaries (the default for a private run): how far the model moved along the canary's
  coordinate and sign, in units of its tensor's spread (white-box);
- input canaries: minus its loss on its own random label (black-box), and how far the run moved
  the model along the canary's own loss gradient (white-box), each tested at half the error.
Guessing "included" for the highest scores and "excluded" for the lowest, the number of right
guesses bounds epsilon from below (Steinke, Nasr and Jagielski, NeurIPS 2023;
privacy/audit_bound.py), at the run's delta and the stated confidence.

What it shows and what it cannot (docs/privacy.md): a bound above the ledger's epsilon means the
run leaked more than accounted, a bug; a bound below it is no proof of privacy, since one run is
a weak attacker and canaries are only one kind of example.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft import adapters
from fedpeft.canary_clients import CanaryClients
from fedpeft.data.canaries import KINDS as CANARY_KINDS
from fedpeft.data.canaries import CanarySet
from fedpeft.errors import ConfigError
from fedpeft.federation import Federation
from fedpeft.privacy.audit_bound import best_guess_bound
from fedpeft.privacy.gradient_canaries import canary_keys
from fedpeft.privacy.one_shot_estimate import estimate_epsilon
from fedpeft.privacy.settings import default_delta
from fedpeft.runtime import adapter_spec
from fedpeft.tasks import collate

#: audit options given beside the run's overrides, with their defaults
OPTIONS = {
    "canaries": 1000,
    "canary_seed": 0,
    "canary_kind": "auto",
    "confidence": 0.95,
    "canary_clients": 0,
}
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
    if options["canary_clients"] != 0 and not 2 <= options["canary_clients"] <= 10_000:
        raise ConfigError(
            f"canary_clients={options['canary_clients']} must be 0 (none) or in [2, 10000], "
            "e.g. 100 (keep it well below the number of real clients: they join the averaging)"
        )
    if options["canary_kind"] not in ("auto", *CANARY_KINDS):
        raise ConfigError(
            f"canary_kind={options['canary_kind']} is unknown: choose auto (gradient canaries "
            "for a private run, input canaries otherwise), gradient or input"
        )
    return overrides, options


def canary_set(fed: Federation, options: dict[str, Any]) -> CanarySet:
    """The audit's canaries for `fed`: gradient ones for a private run unless asked otherwise."""
    private = bool(fed.task["dp"]["enabled"])
    kind = options["canary_kind"]
    if kind == "auto":
        kind = "gradient" if private else "input"
    if kind == "gradient" and not private:
        raise ConfigError(
            "gradient canaries enter DP-SGD's clipped sum and this run has no dp: audit it with "
            "canary_kind=input, or run it private (e.g. dp=eps3)"
        )
    return CanarySet(options["canaries"], options["canary_seed"], kind=kind)


def insert_canaries(fed: Federation, canaries: CanarySet) -> None:
    """Put the canaries into the run's task, so every simulated client adds the ones it holds."""
    if canaries.kind == "input" and fed.task["task"] != "classification":
        raise ConfigError(
            "fedpeft audit builds input canaries for classification tasks: use a classification "
            "dataset (sst2, trec, banking77, spamassassin) or canary_kind=gradient"
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


def coordinate_scores(
    fed: Federation, canaries: CanarySet, initial: dict[str, torch.Tensor]
) -> np.ndarray:
    """(m,) float64: gradient canaries' scores, sign_i * (theta_0 - theta_T)[j_i] / spread.

    A sampled canary adds sign * C at coordinate j to the clipped sum, so training moves theta_j
    against the sign; spread is the standard deviation of the whole tensor's movement (the noise
    and the real examples' pull), so tensors trained at different rates compare.
    """
    runtime = fed.evaluator.runtime
    spec = adapter_spec(fed.task)
    live = adapters.adapter_tensors(runtime.model)
    keys = canary_keys(live, adapters.select_keys(live, spec.trained_factors, spec.train_head))
    final = fed.strategy.global_adapter
    unseen = [
        k for k in keys if k not in final or k not in initial or final[k].shape != live[k].shape
    ]
    if unseen:
        raise ConfigError(
            f"the global adapter does not hold the clients' trained tensors as they train them "
            f"({unseen[0]} and {len(unseen) - 1} more): this method keeps factors local or "
            "reshapes them, so audit it with canary_kind=input"
        )
    tensor, flat, sign = canaries.coordinates([live[k].numel() for k in keys])
    moved = [(initial[k] - final[k]).double().reshape(-1) for k in keys]
    spread = [max(float(m.std()), 1e-30) for m in moved]
    return np.array(
        [s * float(moved[t][f]) / spread[t] for t, f, s in zip(tensor, flat, sign, strict=True)]
    )


def alignment_scores(
    fed: Federation, examples: Sequence[dict], initial: dict[str, torch.Tensor]
) -> np.ndarray:
    """(m,) float64: how far the run moved the global model along each canary's own gradient.

    score_i = <theta_0 - theta_T, g_i> / ||g_i||, g_i the canary's loss gradient at the round-0
    global adapter theta_0 over the trained tensors. Training on canary i moves theta along
    -g_i, so an included canary scores high; an excluded one sees only the other examples and
    the noise projected on a direction they do not favour (white-box: it reads the weights).
    """
    runtime = fed.evaluator.runtime
    runtime.reset(initial, ())
    runtime.model.eval()
    live = adapters.adapter_tensors(runtime.model)
    final = fed.strategy.global_adapter
    keys = [k for k in initial if k in final and k in live and live[k].requires_grad]
    delta = {k: (initial[k] - final[k]).double() for k in keys}
    params = [live[k] for k in keys]
    scores = np.empty(len(examples))
    for i, example in enumerate(examples):
        batch = collate([example], runtime.tokenizer.pad_token_id)
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        loss = runtime.model(**batch).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        dot, norm = 0.0, 0.0
        for key, grad in zip(keys, grads, strict=True):
            if grad is not None:
                grad = grad.detach().cpu().double()
                dot += float((delta[key] * grad).sum())
                norm += float(grad.square().sum())
        scores[i] = dot / max(norm**0.5, 1e-30)
    return scores


def run_delta(fed: Federation) -> float:
    """The largest delta any client runs at (the weakest claim), or the nominal one without DP."""
    dp = fed.task["dp"]
    if not dp["enabled"]:
        return NON_PRIVATE_DELTA
    if dp["delta"] is not None:
        return float(dp["delta"])
    return default_delta(min(fed.partition_sizes))


def add_canary_clients(fed: Federation, count: int, seed: int) -> CanaryClients:
    """Join `count` canary clients to every round of `fed`, sampled at the run's rate."""
    clients = CanaryClients(count, seed, float(fed.cfg.federation.fraction))
    fed.strategy.canary_clients = clients
    return clients


def client_level_estimate(
    clients: CanaryClients,
    initial: dict[str, torch.Tensor],
    final: dict[str, torch.Tensor],
    delta: float,
    accounted: float | None = None,
) -> dict[str, Any]:
    """Andrew et al.'s client-level epsilon estimate from the canary clients' cosines.

    `accounted`: the run's client-level epsilon under `client_dp` (None: not accounted), set
    beside the estimate.
    """
    inserted, null = clients.cosines(initial, final)
    estimate = estimate_epsilon(inserted, null, delta)
    return {
        "accounted_client_level_epsilon": accounted,
        "epsilon_estimate": estimate.epsilon,
        "epsilon_two_gaussians": estimate.epsilon_two_gaussians,
        "delta": delta,
        "canary_clients": clients.count,
        "canary_clients_inserted": int((clients.rounds_in > 0).sum()),
        "mean_rounds_in": float(clients.rounds_in.mean()),
        "cosine_inserted": [estimate.mean_inserted, estimate.std_inserted],
        "cosine_null": [estimate.mean_null, estimate.std_null],
        "estimator": "Andrew et al. (ICLR 2024), one-shot estimate from canary clients' "
        "cosines with the final model; an estimate, not a bound (the accounted client-level "
        "epsilon is client_dp's)",
    }


def audit_federation(
    fed: Federation,
    canaries: CanarySet,
    accounted: float | None,
    confidence: float,
    initial: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Score the canaries on `fed`'s final model and bound epsilon; the audit's record.

    Gradient canaries have one score. Input canaries have two (black-box loss, white-box gradient
    alignment), each tested at half the allowed error (a union bound), so the larger of the two
    bounds holds at `confidence`.
    """
    included = canaries.included()
    delta = run_delta(fed)
    if canaries.kind == "gradient":
        scores = {"coordinate": coordinate_scores(fed, canaries, initial)}
    else:
        tokenizer = fed.evaluator.runtime.tokenizer
        examples = canaries.examples(tokenizer, int(fed.task["num_labels"]))
        scores = {
            "loss": canary_scores(fed, examples),
            "alignment": alignment_scores(fed, examples, initial),
        }
    each = 1 - (1 - confidence) / len(scores)
    bounds = {
        name: best_guess_bound(values, included, delta, each) for name, values in scores.items()
    }
    score, bound = max(bounds.items(), key=lambda item: item[1].epsilon)
    return {
        "audited_epsilon_lower_bound": bound.epsilon,
        "by_score": {name: b.epsilon for name, b in bounds.items()},
        "score": score,
        "accounted_epsilon": accounted,
        "private": bool(fed.task["dp"]["enabled"]),
        "delta": delta,
        "confidence": confidence,
        "canaries": canaries.count,
        "canary_kind": canaries.kind,
        "canaries_included": int(included.sum()),
        "guesses": bound.guesses,
        "correct": bound.correct,
        "k_plus": bound.k_plus,
        "k_minus": bound.k_minus,
        "candidates": bound.candidates,
        "estimator": "Steinke, Nasr and Jagielski (NeurIPS 2023), one-run audit; each score at "
        "an equal share of the error, union bound over the guess counts",
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
    prepared: dict[str, Any] = {}

    def with_canaries(fed: Federation) -> None:
        prepared["canaries"] = canary_set(fed, options)
        insert_canaries(fed, prepared["canaries"])
        if options["canary_clients"]:
            prepared["clients"] = add_canary_clients(
                fed, options["canary_clients"], options["canary_seed"]
            )
        prepared["fed"] = fed
        prepared["initial"] = {k: v.clone() for k, v in fed.strategy.global_adapter.items()}

    result = simulate(overrides, on_prepared=with_canaries)
    record = audit_federation(
        prepared["fed"],
        prepared["canaries"],
        result.get("max_epsilon"),
        options["confidence"],
        prepared["initial"],
    )
    if "clients" in prepared:
        mechanism = prepared["fed"].strategy.client_dp
        record["client_level"] = client_level_estimate(
            prepared["clients"],
            prepared["initial"],
            prepared["fed"].strategy.global_adapter,
            record["delta"] if mechanism is None else mechanism.noise.delta,
            None if mechanism is None else mechanism.epsilon(),
        )
    write_audit(Path(result["run_dir"]), record)
    return record
