"""Neighbour replay (issue 28, rung 1): a client's private round really applies DP-SGD.

One private round runs through the real ClientApp train handler (`client_app.train_round`) on a
data set D and on a neighbour of D, with the Poisson sampler's and the noise's randomness fixed
(`dp.reproducible`), and is instrumented inside Opacus' DPOptimizer right where the noise goes in:
`add_noise` (each parameter's clipped per-example sum `p.summed_grad`, the noise std it draws
with, the noise it drew), `scale_grad` (the divisor, Opacus' `expected_batch_size`, as set and as
applied) and a step pre-hook on the wrapped torch optimiser, registered after the client's own
hooks (what the parameters really step with, FedProx/SCAFFOLD and HetLoRA's penalty included).
`neighbour_violations` then checks, step by step, the facts the accountant's epsilon rests on:

- sensitivity: the clipped sums of D and its neighbour differ by at most C (2C for a replaced
  example) in L2 over all trained tensors;
- steps, divisor and noise: the same number of noised steps, the same divisor q n_k, the same
  noise std sigma C, equal to the ledger's sigma (the one the reply reports and the accountant
  counts) times the task's C, and noise of that std really added;
- post-noise: whatever joins the gradient after the noise (FedProx, SCAFFOLD, the HetLoRA
  penalty) is the same in both runs at the same parameters, i.e. does not depend on the data,
  and where the test names it, is exactly the documented term;
- release: every reply metric is identical, or declared public (n_k: docs/privacy.md, "Whose
  count is it"), or a function of the released tensors (their rank and byte size).

How the two runs are coupled (the replay's own validity, reported as `coupling` / `vacuous`):
- Opacus' sampler draws `torch.rand(n)` per step. Dropping the last example keeps the first
  step's draws for the others (a prefix) but shifts every later step's, so every shared example
  could be drawn differently. The replay's sampler (CoupledSampler, Opacus' own when the width is
  the data's size) draws `width` uniforms per step in every run and keeps those of existing
  indices: the neighbours differ only in the last position and share every other decision.
- q = B / n_k, the calibrated sigma and the default delta are functions of the count n_k, which
  the node declares public. Add-or-remove DP (what Opacus' accountant counts) compares one
  mechanism, calibrated at D's n_k, on D and on D plus or minus one example, so the replay pins
  the ledger's count to |D| in both runs; everything else runs as shipped.
- Adaptive composition: step t's guarantee holds given the parameters released so far, so the
  neighbour's run is held in lockstep with D's: after each of its steps its trained tensors are
  set to D's (a step post-hook). Without it the shared examples' gradients would be taken at
  different parameters after the first step, and nothing would bound their difference by C.
- Dropout is off: its masks are drawn per batch tensor, so a shared example would get another
  mask in a batch of another shape.
- C is small (1e-3): every per-example gradient exceeds it, so clipping acts on every example
  and a build without clipping shows.

The broken builds at the end (noise drawn at multiplier 0 while the ledger counts sigma, clipping
removed, the actual batch as divisor, the training loss released, the clipped mean added again
after the noise) must each be caught by the violation that names the defect.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.optimizers import DPOptimizer
from opacus.optimizers import optimizer as opacus_optimizer
from opacus.optimizers import optimizer_fast_gradient_clipping as opacus_fast_clipping
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedpeft import adapters, privacy
from fedpeft.adapters import CONTROL_PREFIX
from fedpeft.clients import client_app
from fedpeft.clients.client_data import client_examples
from fedpeft.clients.rank_pruning import tail_score
from fedpeft.config import compose_config
from fedpeft.errors import FedPeftError
from fedpeft.federation import build_task
from fedpeft.privacy import dp_sgd, release
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.policy import NodePolicy
from fedpeft.protocol import (
    ADAPTER_RANK,
    BYTES_UP,
    DP_STEPS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    RANK_MIN,
    RANK_PRUNE_GAMMA,
    RANK_PRUNE_LAMBDA,
    SAMPLE_RATE,
    STEPS,
    TRAIN_LOSS,
)
from fedpeft.records import record_bytes, to_record
from fedpeft.runtime import adapter_spec, model_runtime
from tests.conftest import FAST_RUN

C = 1e-3  # clipping bound: below every per-example gradient norm of tiny_bert's factors and head
BATCH = 4  # logical (expected) batch B
N = 16  # |D|: q = 1/4, round(q (N +- 1)) = B; the seed samples D's last and the added one
ROUND_STEPS = 3
SIGMA = 3.0  # fixed, so no run calibrates (the pinned count would give the same sigma anyway)
NODE = {"partition-id": 0, "num-partitions": 2}
#: the documented release policy as shipped (a broken build may widen the module's own copy)
SHIPPED_RELEASE = frozenset(release.PRIVATE_REPLY_METRICS)
#: reply values the policy declares public: n_k (docs/privacy.md, "Whose count is it")
DECLARED_PUBLIC = frozenset({NUM_EXAMPLES})
#: reply values that are functions of the released tensors (post-processing): rank and size
FROM_RELEASED_TENSORS = frozenset({ADAPTER_RANK, BYTES_UP})
RELATIONS = ("remove", "add", "replace")
SENSITIVITY_RTOL, SENSITIVITY_ATOL = 1e-4, 1e-8
NOISE_STD_RTOL = 0.25  # empirical std of >= 380 Gaussian draws; a missing noise is off by 100%

Tensors = dict[str, torch.Tensor]


# -- what one run records -----------------------------------------------------------------------


@dataclass
class Step:
    """One noised DP-SGD step, as the optimiser saw it."""

    batch: list[int]  # the logical Poisson batch (indices into the run's examples)
    params: Tensors  # trained tensors before the step
    summed: Tensors  # sum of the clipped per-example gradients (p.summed_grad), before noise
    noise: Tensors  # what add_noise added
    noise_std: float  # the std add_noise drew with (effective sigma x the optimiser's C)
    divisor: float  # expected_batch_size x accumulated_iterations, as set on the optimiser
    applied_divisor: float  # ||grad before scale_grad|| / ||after||: what was really divided by
    noisy_mean: Tensors  # p.grad after scale_grad
    update: Tensors  # p.grad the torch optimiser steps with, after every hook


@dataclass
class Trace:
    """A whole replayed round: its steps and its reply."""

    num_examples: int
    steps: list[Step] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)
    metrics: dict[str, float | int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reply_bytes: int = 0


def _flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().reshape(-1) for k in sorted(tensors)])


def _clone(params: Sequence[torch.Tensor], names: Mapping[int, str], attr: str) -> Tensors:
    return {names[id(p)]: getattr(p, attr).detach().clone().view_as(p) for p in params}


class CoupledSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler drawing `width` uniforms a step and keeping the existing indices.

    With width = num_samples it is Opacus' sampler, draw for draw; with a common width, runs on
    D and on D minus or plus its last example make the same decision for every shared example.
    """

    def __init__(self, *, width: int, on_batch: Callable[[list[int]], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.width = max(width, self.num_samples)
        self.on_batch = on_batch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.width, generator=self.generator) < self.sample_rate
            batch = [i for i in mask.nonzero().reshape(-1).tolist() if i < self.num_samples]
            self.on_batch(batch)
            yield batch


class Replay:
    """Instruments DP-SGD (once per test, through monkeypatch) and runs replayed rounds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.runs = 0
        self.trace: Trace | None = None
        self.names: dict[int, str] = {}
        self.leader: Trace | None = None
        self.width = N
        self.public_count = N
        self.dataset: list[dict] = []
        self.stack = contextlib.ExitStack()
        replay = self

        def coupled(**kwargs: Any) -> CoupledSampler:
            return CoupledSampler(width=replay.width, on_batch=replay._on_batch, **kwargs)

        monkeypatch.setattr(dp_sgd, "UniformWithReplacementSampler", coupled)
        monkeypatch.setattr(client_app, "client_examples", lambda task, node: list(self.dataset))
        real_runtime = client_app.model_runtime

        def runtime(task: Mapping[str, Any]) -> Any:
            """The handler's own runtime, dropout off for the round, its tensors named."""
            rt = real_runtime(task)
            replay.names = {id(p): k for k, p in adapters.adapter_tensors(rt.model).items()}
            replay.stack.enter_context(no_dropout(rt.model))
            return rt

        monkeypatch.setattr(client_app, "model_runtime", runtime)
        real_open = PrivacyLedger.open.__func__  # type: ignore[attr-defined]

        def pinned(cls: type, store: Any, settings: Any, _n: int, *rest: Any) -> PrivacyLedger:
            return real_open(cls, store, settings, replay.public_count, *rest)

        monkeypatch.setattr(PrivacyLedger, "open", classmethod(pinned))
        for cls in (DPOptimizer, DPOptimizerFastGradientClipping):
            monkeypatch.setattr(cls, "add_noise", self._add_noise(cls.__dict__["add_noise"]))
        monkeypatch.setattr(DPOptimizer, "scale_grad", self._scale_grad(DPOptimizer.scale_grad))

    def _on_batch(self, batch: list[int]) -> None:
        assert self.trace is not None
        self.trace.batches.append(list(batch))

    def _add_noise(self, real: Callable[[DPOptimizer], None]) -> Callable[[DPOptimizer], None]:
        replay = self

        @functools.wraps(real)
        def add_noise(opt: DPOptimizer) -> None:
            assert replay.trace is not None
            if not getattr(opt, "_replay_hooked", False):  # after the client's own hooks
                opt._replay_hooked = True  # type: ignore[attr-defined]
                opt.original_optimizer.register_step_pre_hook(replay._before_step)
                opt.original_optimizer.register_step_post_hook(replay._after_step)
            summed = _clone(opt.params, replay.names, "summed_grad")
            real(opt)
            grad = _clone(opt.params, replay.names, "grad")
            sigma = getattr(opt, "_adjusted_noise_multiplier", opt.noise_multiplier)
            replay.trace.steps.append(
                Step(
                    batch=replay.trace.batches[-1],
                    params=_clone(opt.params, replay.names, "data"),
                    summed=summed,
                    noise={k: grad[k] - summed[k] for k in grad},
                    noise_std=float(sigma * opt.max_grad_norm),
                    divisor=0.0,
                    applied_divisor=0.0,
                    noisy_mean={},
                    update={},
                )
            )

        return add_noise

    def _scale_grad(self, real: Callable[[DPOptimizer], None]) -> Callable[[DPOptimizer], None]:
        replay = self

        @functools.wraps(real)
        def scale_grad(opt: DPOptimizer) -> None:
            assert replay.trace is not None
            before = _flat(_clone(opt.params, replay.names, "grad"))
            real(opt)
            after = _clone(opt.params, replay.names, "grad")
            step = replay.trace.steps[-1]
            step.divisor = float(opt.expected_batch_size * opt.accumulated_iterations)
            step.applied_divisor = float(before.norm() / _flat(after).norm())
            step.noisy_mean = after

        return scale_grad

    def _before_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self.trace is not None
        params = [p for g in opt.param_groups for p in g["params"] if id(p) in self.names]
        self.trace.steps[-1].update = _clone(params, self.names, "grad")

    @torch.no_grad()
    def _after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Lockstep: the neighbour continues from the leader's (D's) parameters of the next step."""
        assert self.trace is not None
        t = len(self.trace.steps)
        if self.leader is None or t >= len(self.leader.steps):
            return
        for p in (p for g in opt.param_groups for p in g["params"] if id(p) in self.names):
            p.copy_(self.leader.steps[t].params[self.names[id(p)]])

    def run(
        self,
        task: dict[str, Any],
        dataset: list[dict],
        *,
        payload: Mapping[str, torch.Tensor] | None = None,
        config: Mapping[str, Any] | None = None,
        leader: Trace | None = None,
        width: int = N + 1,
        public_count: int = N,
    ) -> Trace:
        """One private round of `dataset` through the real train handler, recorded.

        `leader`: the D run this (neighbour) run follows in lockstep; `width`: the sampler's
        coupling width; `public_count`: the n_k the ledger calibrates for.
        """
        self.runs += 1
        state_dir = self.tmp_path / f"run{self.runs}"
        self.dataset, self.width, self.public_count = list(dataset), width, public_count
        self.leader, self.trace = leader, Trace(len(dataset))
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        round_config = {"task": json.dumps(task), "server-round": 1, **(config or {})}
        msg = Message(
            RecordDict({"arrays": to_record(payload or {}), "config": ConfigRecord(round_config)}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        node = {**NODE, "state-dir": str(state_dir)}
        context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
        policy = NodePolicy.for_simulation(task["dp"], state_dir)
        with contextlib.ExitStack() as self.stack, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            reply = client_app.train_round(msg, context, policy)
        trace, self.trace, self.leader = self.trace, None, None
        arrays = reply.content.array_records["arrays"]
        trace.metrics = dict(reply.content.metric_records["metrics"])
        trace.shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        trace.reply_bytes = record_bytes(arrays)
        return trace

    def neighbours(
        self,
        task: dict[str, Any],
        examples: Sequence[dict],
        relations: Sequence[str] = RELATIONS,
        *,
        n: int = N,
        **kwargs: Any,
    ) -> tuple[Trace, dict[str, Trace]]:
        """D = examples[:n], replayed once, and each neighbour (remove/add/replace) against it.

        The sampler's width is n + 1 in every run, so all of them share D's sampling decisions
        (the `add` neighbour's run is Opacus' sampler draw for draw).
        """
        d, extra = list(examples[:n]), examples[n]
        data = {"remove": d[:-1], "add": [*d, extra], "replace": [*d[:-1], extra]}
        lead = self.run(task, d, width=n + 1, public_count=n, **kwargs)
        return lead, {
            relation: self.run(
                task, data[relation], leader=lead, width=n + 1, public_count=n, **kwargs
            )
            for relation in relations
        }


@contextlib.contextmanager
def no_dropout(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off (its masks are drawn per batch tensor, so batch shapes would change them)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in layers]
    for m in layers:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(layers, rates, strict=True):
            m.p = p


# -- the checker --------------------------------------------------------------------------------


def _differing(relation: str, n: int) -> tuple[int | None, int | None]:
    """The index of the differing example in D's run and in the neighbour's (None: absent)."""
    return {"remove": (n - 1, None), "add": (None, n), "replace": (n - 1, n - 1)}[relation]


def _close(a: float, b: float, rtol: float = 1e-6) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30)


def neighbour_violations(
    d: Trace,
    nb: Trace,
    relation: str,
    *,
    max_grad_norm: float,
    post_noise: Callable[[Tensors, Tensors], Tensors] | None = None,
) -> list[str]:
    """What in a replay of D (`d`) and its neighbour (`nb`) contradicts DP-SGD's guarantee.

    `relation`: "remove" (nb = D minus its last example), "add" (nb = D plus one at the end) or
    "replace" (nb = D with its last example replaced). `max_grad_norm` is the task's C, the one
    the accountant assumes. `post_noise(params_t, params_0)`, where given, is the documented
    data-independent term added after the noise; it is checked in both runs. Each violation
    starts with its kind: sensitivity, steps, divisor, noise, post-noise, release, and for the
    replay's own validity coupling and vacuous. An empty list: the round was private.
    """
    out: list[str] = []
    n = d.num_examples
    bound = (2 if relation == "replace" else 1) * max_grad_norm
    in_d, in_nb = _differing(relation, n)
    shared = n - 1 if relation in ("remove", "replace") else n
    sigma = float(d.metrics.get(NOISE_MULTIPLIER, float("nan")))
    q = float(d.metrics.get(SAMPLE_RATE, float("nan")))
    expected_divisor = max(1, round(q * n))

    if len(d.steps) != len(nb.steps) or len(d.steps) != len(d.batches):
        out.append(
            f"steps: D took {len(d.steps)} noised steps of {len(d.batches)} sampled, its "
            f"neighbour {len(nb.steps)}"
        )
    for name, run in (("D", d), ("neighbour", nb)):
        claimed = (run.metrics.get(STEPS), run.metrics.get(DP_STEPS))
        if claimed != (len(run.steps), len(run.steps)):
            out.append(
                f"steps: {name}'s reply claims {claimed[0]} steps ({claimed[1]} DP-SGD steps), "
                f"{len(run.steps)} were noised"
            )
    sampled = False
    for t, (a, b) in enumerate(zip(d.steps, nb.steps, strict=False)):
        if [i for i in a.batch if i < shared] != [i for i in b.batch if i < shared]:
            out.append(f"coupling: step {t}: the shared examples were sampled differently")
        if not torch.equal(_flat(a.params), _flat(b.params)):
            out.append(f"coupling: step {t}: the runs did not start the step at one point")
        scale = float(_flat(a.summed).abs().max() + _flat(a.noise).abs().max())
        same_noise = torch.allclose(_flat(a.noise), _flat(b.noise), rtol=0, atol=1e-6 * scale)
        if not same_noise and a.noise_std == b.noise_std:  # (summed + noise) - summed: rounding
            out.append(f"coupling: step {t}: the noise draws differ")
        sampled |= in_d in a.batch or in_nb in b.batch
        gap = float((_flat(a.summed) - _flat(b.summed)).norm())
        if gap > bound * (1 + SENSITIVITY_RTOL) + SENSITIVITY_ATOL:
            out.append(
                f"sensitivity: step {t}: the clipped sums differ by {gap:.6g} > "
                f"{'2C' if relation == 'replace' else 'C'} = {bound:g}"
            )
        for name, run in (("D", a), ("neighbour", b)):
            if not _close(run.divisor, expected_divisor):
                out.append(
                    f"divisor: step {t}: {name}'s expected_batch_size is {run.divisor:g}, not "
                    f"q n_k = {expected_divisor}"
                )
            if not _close(run.applied_divisor, run.divisor, 1e-4):
                out.append(
                    f"divisor: step {t}: {name}'s gradient was divided by "
                    f"{run.applied_divisor:.6g}, not by expected_batch_size {run.divisor:g}"
                )
            if not _close(run.noise_std, sigma * max_grad_norm):
                out.append(
                    f"noise: step {t}: {name} drew noise of std {run.noise_std:g}, but the ledger "
                    f"accounts for sigma C = {sigma:g} x {max_grad_norm:g}"
                )
            drawn = _flat(run.noise)
            empirical = float(drawn.std())
            if not abs(empirical - sigma * max_grad_norm) <= NOISE_STD_RTOL * sigma * max_grad_norm:
                out.append(
                    f"noise: step {t}: {name}'s added noise has std {empirical:.3g} over "
                    f"{drawn.numel()} coordinates, not sigma C = {sigma * max_grad_norm:g}"
                )
            if post_noise is not None and run.update:
                term = {k: run.update[k] - run.noisy_mean[k] for k in run.update}
                want = post_noise(run.params, d.steps[0].params)
                if not torch.allclose(_flat(term), _flat(want), rtol=1e-4, atol=1e-7):
                    out.append(
                        f"post-noise: step {t}: {name}'s gradient gained something other than "
                        "the documented data-independent term after the noise"
                    )
        if a.divisor != b.divisor or not _close(a.applied_divisor, b.applied_divisor, 1e-4):
            out.append(
                f"divisor: step {t}: D divided by {a.applied_divisor:.6g}, its neighbour by "
                f"{b.applied_divisor:.6g}"
            )
        if a.noise_std != b.noise_std:
            out.append(f"noise: step {t}: std {a.noise_std:g} for D, {b.noise_std:g} neighbour")
        if a.update and b.update:
            after = [{k: r.update[k] - r.noisy_mean[k] for k in r.update} for r in (a, b)]
            if not torch.allclose(_flat(after[0]), _flat(after[1]), rtol=1e-5, atol=1e-9):
                out.append(
                    f"post-noise: step {t}: the term added after the noise differs between D "
                    "and its neighbour at the same parameters: it depends on the data"
                )
    if d.steps and not sampled:
        out.append(
            "vacuous: the differing example was never sampled, so the replay compared nothing: "
            "change N or the task's seed"
        )
    out.extend(_release_violations(d, nb))
    return out


def _release_violations(d: Trace, nb: Trace) -> list[str]:
    """Reply metrics: identical, declared public, or functions of the released tensors."""
    out = []
    for name, run in (("D", d), ("neighbour", nb)):
        if run.metrics.get(NUM_EXAMPLES) != run.num_examples:
            out.append(f"release: {name}'s num-examples is not its example count n_k")
        extra = sorted(set(run.metrics) - SHIPPED_RELEASE)
        if extra:
            out.append(f"release: {name}'s private reply carries {', '.join(extra)}")
        if BYTES_UP in run.metrics and run.metrics[BYTES_UP] != run.reply_bytes:
            out.append(f"release: {name}'s bytes-up is not the size of its reply's tensors")
        ranks = {s[0] for k, s in run.shapes.items() if k.endswith(".lora_A")}
        if ADAPTER_RANK in run.metrics and ranks != {run.metrics[ADAPTER_RANK]}:
            out.append(f"release: {name}'s adapter-rank is not the rank of its released factors")
    for key in sorted(set(d.metrics) | set(nb.metrics)):
        if key in DECLARED_PUBLIC or key in FROM_RELEASED_TENSORS:
            continue
        if d.metrics.get(key) != nb.metrics.get(key):
            out.append(
                f"release: {key} is {d.metrics.get(key)} for D and {nb.metrics.get(key)} for its "
                "neighbour, and is not declared public"
            )
    if d.metrics.get(ADAPTER_RANK) == nb.metrics.get(ADAPTER_RANK) and d.shapes != nb.shapes:
        out.append("release: the released tensors' keys or shapes differ between D and neighbour")
    return out


def _kinds(violations: Sequence[str]) -> set[str]:
    return {v.split(":", 1)[0] for v in violations}


# -- fixtures ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _base_task_json() -> str:
    """The replay's task (composed once: Hydra takes a quarter of a second a call)."""
    cfg = compose_config(
        [
            *FAST_RUN,
            "dp=eps3",
            f"dp.noise_multiplier={SIGMA}",
            f"dp.max_grad_norm={C}",
            "dp.max_physical_batch_size=null",
            "dp.reproducible=true",
            f"train.batch_size={BATCH}",
            f"federation.local_steps={ROUND_STEPS}",
        ]
    )
    return json.dumps(build_task(cfg, 2, ["negative", "positive"]))


def _task(kind: str = "lora", **changes: Any) -> dict[str, Any]:
    """A fresh copy of the replay's task with the adapter `kind` and top-level `changes`."""
    task = json.loads(_base_task_json())
    task["adapter"]["kind"] = kind
    for key, value in changes.items():
        task[key] = value
    return task


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for this module: tiny_bert's matrices gain nothing from two, and on a
    busy 2-core runner the second thread's spinning tripled the file's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool(data_dir: Path) -> list[dict]:
    """Partition 0's real SST-2 examples; D is a prefix, the added example the next one."""
    return client_examples(_task(), NODE)


@pytest.fixture
def replay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Replay:
    return Replay(monkeypatch, tmp_path)


def _payload(task: dict[str, Any], seed: int = 0) -> Tensors:
    """A global adapter a few rounds in: the round-0 one with B (and R) away from zero.

    With B = 0 the gradients of A and R vanish and frozen_b / sb would train the head only.
    """
    runtime = model_runtime(task)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in runtime.initial.items():
        if key.endswith((".lora_B", ".lora_R")):
            value = 0.1 * torch.randn(value.shape, generator=g)
        out[key] = value.clone()
    return out


def _trained_keys(task: dict[str, Any]) -> list[str]:
    spec = adapter_spec(task)
    keys = adapters.adapter_tensors(model_runtime(task).model)
    return adapters.select_keys(keys, spec.trained_factors, spec.train_head)


def _mode(task: dict[str, Any], mode: str, **dp: Any) -> dict[str, Any]:
    return {**task, "dp": {**task["dp"], "grad_sample_mode": mode, **dp}}


# -- the honest builds ---------------------------------------------------------------------------


def test_the_coupled_sampler_is_opacus_sampler_when_the_width_is_the_data_size() -> None:
    """The replay's only change to sampling is the coupling: at width n it is Opacus' sampler."""

    def batches(sampler_cls: Callable[..., UniformWithReplacementSampler]) -> list[list[int]]:
        g = torch.Generator().manual_seed(11)
        return list(sampler_cls(num_samples=N, sample_rate=0.3, generator=g, steps=5))

    coupled = functools.partial(CoupledSampler, width=N, on_batch=lambda b: None)
    assert batches(coupled) == batches(UniformWithReplacementSampler)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("kind", ["lora", "frozen_a", "frozen_b", "sb"])
def test_every_adapter_kind_with_its_head_is_private_against_each_neighbour(
    replay: Replay, pool: list[dict], kind: str, mode: str
) -> None:
    """Each kind's factors and the head, D against D minus its last, plus one, and replaced."""
    task = _mode(_task(kind=kind), mode)
    assert adapter_spec(task).train_head
    payload = _payload(task)
    d, neighbours = replay.neighbours(task, pool, payload=payload)
    assert len(d.steps) == ROUND_STEPS
    for relation, nb in neighbours.items():
        assert neighbour_violations(d, nb, relation, max_grad_norm=C) == []
        assert (d.metrics[NUM_EXAMPLES], nb.metrics[NUM_EXAMPLES]) == (
            N,
            {"remove": N - 1, "add": N + 1, "replace": N}[relation],
        )


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize(
    "client_opt",
    [{"proximal_mu": 1.0, "scaffold": False}, {"proximal_mu": 0.0, "scaffold": True}],
    ids=["fedprox", "scaffold"],
)
def test_drift_correction_joins_after_the_noise_and_does_not_depend_on_the_data(
    replay: Replay, pool: list[dict], client_opt: dict, mode: str
) -> None:
    """FedProx's mu (theta - theta_0) and SCAFFOLD's c - c_k are added by a step pre-hook of the
    wrapped optimiser, after Opacus clipped, noised and divided: outside the clipped sum (which
    the sensitivity check bounds by C alone), data-independent, and exactly the documented term.
    """
    task = _mode(_task(client_opt=client_opt), mode)
    payload = _payload(task)
    g = torch.Generator().manual_seed(1)
    control = {k: 0.05 * torch.randn(payload[k].shape, generator=g) for k in _trained_keys(task)}
    if client_opt["scaffold"]:
        payload = {**payload, **{f"{CONTROL_PREFIX}{k}": v for k, v in control.items()}}
    mu = client_opt["proximal_mu"]

    def documented(params: Tensors, start: Tensors) -> Tensors:
        shift = control if client_opt["scaffold"] else dict.fromkeys(params, 0.0)
        return {k: mu * (params[k] - start[k]) + shift[k] for k in params}

    d, neighbours = replay.neighbours(task, pool, ("remove", "add"), payload=payload)
    for relation, nb in neighbours.items():
        assert neighbour_violations(d, nb, relation, max_grad_norm=C, post_noise=documented) == []
        last = nb.steps[-1]
        term = _flat({k: last.update[k] - last.noisy_mean[k] for k in last.update})
        assert float(term.norm()) > C  # the term is there, beyond what clipping would let through
        assert float(_flat(last.summed).norm()) <= len(last.batch) * C * (1 + SENSITIVITY_RTOL)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_hetlora_penalty_joins_after_the_noise_and_does_not_depend_on_the_data(
    replay: Replay, pool: list[dict], mode: str
) -> None:
    """HetLoRA's lambda x tail score (rank_pruning.penalty, passed to train_private) is added in
    Opacus' step hook after the noise: its gradient at the step's parameters, nothing else."""
    task = _mode(_task(), mode)
    lam, gamma = 0.5, 0.5
    config = {RANK_MIN: 2, RANK_PRUNE_GAMMA: gamma, RANK_PRUNE_LAMBDA: lam}
    start = int(gamma * task["adapter"]["rank"])

    def documented(params: Tensors, _start: Tensors) -> Tensors:
        live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        factors = {k: v for k, v in live.items() if k.endswith((".lora_A", ".lora_B"))}
        grads = torch.autograd.grad(lam * tail_score(factors, start), list(factors.values()))
        out = {k: torch.zeros_like(v) for k, v in params.items()}
        out.update({k: g.detach() for k, g in zip(factors, grads, strict=True)})
        return out

    d, neighbours = replay.neighbours(
        task, pool, ("remove", "add"), payload=_payload(task), config=config
    )
    assert d.metrics[ADAPTER_RANK] in (2, 4, 8)
    for relation, nb in neighbours.items():
        assert neighbour_violations(d, nb, relation, max_grad_norm=C, post_noise=documented) == []
        first = nb.steps[0]
        assert float(_flat({k: first.update[k] - first.noisy_mean[k] for k in first.update}).norm())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_logical_batch_split_into_physical_batches_is_clipped_and_noised_once(
    replay: Replay, pool: list[dict], mode: str
) -> None:
    """dp.max_physical_batch_size below the logical batch: Opacus accumulates the physical
    batches' clipped sums and noises the logical step once, divided by q n_k."""
    task = _mode(_task(), mode, max_physical_batch_size=1)
    payload = _payload(task)
    d, neighbours = replay.neighbours(task, pool, payload=payload)
    assert max(len(b) for b in d.batches) > 1  # a logical batch really was split
    for relation, nb in neighbours.items():
        assert neighbour_violations(d, nb, relation, max_grad_norm=C) == []


SMALL = 3  # fewer examples than the batch: q = min(1, B / n) = 1, the divisor q n = n, not B


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_client_smaller_than_its_batch_divides_by_q_n_not_by_the_batch_size(
    replay: Replay, pool: list[dict], mode: str
) -> None:
    """n_k < B: q = 1, every step takes all n_k examples, and the divisor is q n_k = n_k. Against
    a replaced example (n_k unchanged, the neighbours the docs' replacement guarantee covers)
    everything but the one example's clipped gradient is the same."""
    task = _mode(_task(), mode)
    d, neighbours = replay.neighbours(task, pool, ["replace"], n=SMALL, payload=_payload(task))
    nb = neighbours["replace"]
    assert d.metrics[SAMPLE_RATE] == 1.0
    assert [s.divisor for s in d.steps] == [SMALL] * ROUND_STEPS != [BATCH] * ROUND_STEPS
    assert neighbour_violations(d, nb, "replace", max_grad_norm=C) == []


def test_a_small_client_add_or_remove_neighbour_gets_another_divisor(
    replay: Replay, pool: list[dict]
) -> None:
    """A finding, kept visible: with q = 1, train_private sets expected_batch_size from
    len(examples), not from the ledger's count n_k, so with n_k pinned the neighbour divides by
    n_k -+ 1. Harmless while n_k is public and always len(examples) (docs/privacy.md: replacement
    neighbours, 2 epsilon); if train_private took the count from the ledger this test would show
    no violation and should become an honest one."""
    task = _task()
    d, neighbours = replay.neighbours(
        task, pool, ["remove", "add"], n=SMALL, payload=_payload(task)
    )
    for relation, nb in neighbours.items():
        violations = neighbour_violations(d, nb, relation, max_grad_norm=C)
        assert _kinds(violations) == {"divisor"}, violations
        assert {s.divisor for s in nb.steps} == {SMALL - 1 if relation == "remove" else SMALL + 1}


# -- the broken builds ---------------------------------------------------------------------------


def _broken_zero_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise is drawn at multiplier 0, while the optimiser and its accountant keep sigma.

    (An optimiser built with sigma 0 is no test of the replay: the accountant's hook reads the
    optimiser's sigma, so the ledger records 0 and the round fails before it replies.)
    """
    real = opacus_optimizer._generate_noise

    def silent(std: float, reference: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return real(0.0 * std, reference, **kwargs)

    for module in (opacus_optimizer, opacus_fast_clipping):
        monkeypatch.setattr(module, "_generate_noise", silent)


def _broken_no_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-example clipping at 1e9 (hooks: in the optimiser; ghost: in the module's loss
    rescaling), while the noise keeps sigma C."""
    real_clip = DPOptimizer.clip_and_accumulate

    def unclipped(opt: DPOptimizer) -> None:
        bound, opt.max_grad_norm = opt.max_grad_norm, 1e9
        try:
            real_clip(opt)
        finally:
            opt.max_grad_norm = bound

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", unclipped)
    real_prepare = dp_sgd.prepare_module

    def prepare(*args: Any, **kwargs: Any) -> Any:
        hooks = real_prepare(*args, **kwargs)
        if hasattr(hooks, "max_grad_norm"):
            hooks.max_grad_norm = 1e9
        return hooks

    monkeypatch.setattr(dp_sgd, "prepare_module", prepare)


def _broken_actual_batch_divisor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Divide by the examples the step really drew (its physical batches) instead of q n."""
    seen = [0]
    real_collate = dp_sgd._collate_or_none

    def counting(batch: list, pad_token_id: int) -> Any:
        seen[0] += len(batch)
        return real_collate(batch, pad_token_id)

    def actual(opt: DPOptimizer) -> None:
        for p in opt.params:
            p.grad /= max(1, seen[0])
        seen[0] = 0

    monkeypatch.setattr(dp_sgd, "_collate_or_none", counting)
    monkeypatch.setattr(DPOptimizer, "scale_grad", actual)


def _broken_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release list lets the training loss through, and the round hands it over."""
    monkeypatch.setattr(release, "PRIVATE_REPLY_METRICS", SHIPPED_RELEASE | {TRAIN_LOSS})
    real = privacy.private_round

    def leaky(*args: Any, **kwargs: Any) -> tuple[Any, dict[str, float]]:
        result, metrics = real(*args, **kwargs)
        return result, {**metrics, TRAIN_LOSS: result.loss}

    monkeypatch.setattr(privacy, "private_round", leaky)


def _broken_clipped_sum_after_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opacus' step hook (where the HetLoRA penalty goes) adds the clipped mean once more,
    unnoised: a data-dependent term after the noise."""
    real = dp_sgd._step_hook

    def leaky(*args: Any, **kwargs: Any) -> Callable[[DPOptimizer], None]:
        hook = real(*args, **kwargs)

        def step(opt: DPOptimizer) -> None:
            hook(opt)
            for p in opt.params:
                p.grad += p.summed_grad.view_as(p) / opt.expected_batch_size

        return step

    monkeypatch.setattr(dp_sgd, "_step_hook", leaky)


def test_an_optimiser_built_with_sigma_0_never_replies(
    monkeypatch: pytest.MonkeyPatch, pool: list[dict], tmp_path: Path
) -> None:
    """The other way to zero the noise, sigma 0 handed to the optimiser, needs no replay: the
    accountant's hook reads the optimiser's sigma, the ledger records 0, and the round fails
    before anything is sent (today inside Opacus' PRV accountant, an OverflowError)."""
    real = dp_sgd.make_dp_optimizer

    def zero(optimizer: torch.optim.Optimizer, **kwargs: Any) -> DPOptimizer:
        return real(optimizer, **{**kwargs, "noise_multiplier": 0.0})

    monkeypatch.setattr(dp_sgd, "make_dp_optimizer", zero)
    replay = Replay(monkeypatch, tmp_path)
    task = _task()
    with pytest.raises((OverflowError, FedPeftError)):
        replay.run(task, pool[:N], payload=_payload(task))
    assert replay.trace is not None and len(replay.trace.steps) == ROUND_STEPS
    assert {s.noise_std for s in replay.trace.steps} == {0.0}


BROKEN = {
    "noise_multiplier_0_in_the_draw": (_broken_zero_noise, {"noise"}),
    "clipping_removed": (_broken_no_clipping, {"sensitivity"}),
    "divisor_is_the_actual_batch": (_broken_actual_batch_divisor, {"divisor"}),
    "train_loss_released": (_broken_release, {"release"}),
    "clipped_sum_added_after_the_noise": (_broken_clipped_sum_after_noise, {"post-noise"}),
}


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("build", sorted(BROKEN))
def test_the_replay_catches_a_broken_build(
    monkeypatch: pytest.MonkeyPatch, pool: list[dict], tmp_path: Path, build: str, mode: str
) -> None:
    """Each deliberately broken build yields exactly the violation that names its defect."""
    breaks, expected = BROKEN[build]
    breaks(monkeypatch)  # before Replay, whose instrumentation then wraps the broken methods
    replay = Replay(monkeypatch, tmp_path)
    task = _mode(_task(), mode)
    d, neighbours = replay.neighbours(task, pool, ["remove"], payload=_payload(task))
    violations = neighbour_violations(d, neighbours["remove"], "remove", max_grad_norm=C)
    assert _kinds(violations) == expected, violations
