"""Client drift correction: FedProx's proximal term and SCAFFOLD's control variates."""

import pytest
import torch
from flwr.app import RecordDict

from fedpeft import adapters, training
from fedpeft.clients import drift
from fedpeft.clients.client_data import client_examples
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import build_task
from fedpeft.round_task import DriftSettings
from fedpeft.runtime import model_runtime
from fedpeft.training import TrainSettings
from tests.conftest import FAST_RUN
from tests.privacy.conftest import flat, private_steps, sgd, trainable

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def task(data_dir) -> dict:
    cfg = compose_config([*FAST_RUN, "train.batch_size=8"])
    return build_task(cfg, num_labels=2)


@pytest.fixture(scope="module")
def examples(task) -> list[dict]:
    return client_examples(task, {"partition-id": 0, "num-partitions": 2})


def _live(model) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in adapters.adapter_tensors(model).items() if p.requires_grad}


def _train(task, examples, optimizer_name: str, correction=None, steps: int = 3) -> dict:
    """A few local steps from the round-0 adapter; the trained tensors after them."""
    runtime = model_runtime(task)
    runtime.reset({})
    hp = TrainSettings.parse({**task["train"], "optimizer": optimizer_name, "local_steps": steps})
    optimizer, steps = training.local_round(runtime.model, hp, len(examples))
    if correction is not None:
        correction = correction(_live(runtime.model))
        correction.attach(optimizer)
    torch.manual_seed(0)
    training.train_steps(
        runtime.model,
        examples,
        optimizer,
        steps=steps,
        batch_size=8,
        pad_token_id=runtime.tokenizer.pad_token_id,
        device=CPU,
        seed=1,
        max_grad_norm=hp.max_grad_norm,
    )
    if correction is not None:
        correction.detach()
    return adapters.read_adapter(runtime.model, _live(runtime.model))


@pytest.mark.parametrize(
    ("optimizer", "make"),
    [
        ("adamw", lambda params: drift.DriftCorrection(params, proximal_mu=0.0)),
        (
            "sgd",
            lambda params: drift.DriftCorrection(
                params, shift={k: torch.zeros_like(p) for k, p in params.items()}
            ),
        ),
    ],
    ids=["fedprox_mu_0", "scaffold_zero_controls"],
)
def test_zero_corrections_train_bit_for_bit_like_plain_training(task, examples, optimizer, make):
    plain = _train(task, examples, optimizer)
    corrected = _train(task, examples, optimizer, make)
    start = model_runtime(task).initial
    assert any(not torch.equal(plain[k], start[k]) for k in plain)  # training moved something
    for key, value in plain.items():
        assert torch.equal(corrected[key], value), key


def _tiny_problem():
    """A float64 linear model and a fixed batch: loss = mean squared error."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)

    def gradient(weight, bias):
        w, b = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        loss = ((x @ w.T + b - y) ** 2).mean()
        return torch.autograd.grad(loss, (w, b))

    def step(optimizer):
        optimizer.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        optimizer.step()

    return layer, gradient, step


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_the_proximal_term_adds_exactly_mu_times_the_distance_to_the_start(weight_decay):
    layer, gradient, step = _tiny_problem()
    params = {"w": layer.weight, "b": layer.bias}
    start = {k: p.detach().clone() for k, p in params.items()}
    lr, mu, steps = 0.1, 0.7, 4
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, weight_decay=weight_decay)
    correction = drift.DriftCorrection(params, proximal_mu=mu)
    correction.attach(optimizer)
    want = {k: v.clone() for k, v in start.items()}
    for _ in range(steps):
        step(optimizer)
        grads = dict(zip(("w", "b"), gradient(want["w"], want["b"]), strict=True))
        for k in want:
            grad = grads[k] + weight_decay * want[k] + mu * (want[k] - start[k])
            want[k] = want[k] - lr * grad
    for k, p in params.items():
        torch.testing.assert_close(p.detach(), want[k], rtol=1e-13, atol=1e-14)
    assert correction.steps == steps


def test_scaffold_option_ii_control_variate_is_the_mean_gradient_under_sgd():
    """c_k+ = c_k - c + (theta_0 - theta_K)/(K lr): the mean uncorrected gradient of K steps."""
    layer, gradient, step = _tiny_problem()
    params = {"w": layer.weight, "b": layer.bias}
    g = torch.Generator().manual_seed(1)
    c = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    c_k = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    lr, steps = 0.05, 5
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    correction = drift.DriftCorrection(params, shift={k: c[k] - c_k[k] for k in c})
    correction.attach(optimizer)
    seen = {k: torch.zeros_like(p) for k, p in params.items()}
    for _ in range(steps):
        grads = gradient(layer.weight, layer.bias)
        for k, grad in zip(("w", "b"), grads, strict=True):
            seen[k] += grad / steps
        step(optimizer)
    new, delta = correction.control_update(c, c_k)
    for k in params:
        torch.testing.assert_close(new[k].double(), seen[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta[k], (new[k].double() - c_k[k]).float())


def test_under_dp_the_proximal_term_stays_outside_the_clipping(task, examples):
    """One huge example gradient, clipped to C, plus a proximal pull much larger than C."""
    runtime = model_runtime(task)
    runtime.reset({})
    model = runtime.model
    params = _live(model)
    g = torch.Generator().manual_seed(0)
    correction = drift.DriftCorrection(params, proximal_mu=10.0)
    offset = {k: 0.01 * torch.randn(p.shape, generator=g) for k, p in params.items()}
    correction.start = {k: v - offset[k] for k, v in correction.start.items()}
    key_of = {id(p): k for k, p in params.items()}
    pull = flat(10.0 * offset[key_of[id(p)]] for p in trainable(model))
    optimizer = sgd(model)
    correction.attach(optimizer)
    before = flat(trainable(model)).clone()
    clip = 1e-3
    result = private_steps(
        model, examples[:1], optimizer, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=clip
    )
    moved = flat(trainable(model)) - before
    assert result.steps == 1 and correction.steps == 1
    assert float(pull.norm()) > 100 * clip  # the proximal step alone is far beyond C
    data_part = float((moved + pull).norm())  # lr 1: moved = -(clipped gradient + mu offset)
    assert data_part <= clip * (1 + 1e-4)
    assert data_part > 0.99 * clip


def test_the_node_keeps_c_k_and_refuses_scaffold_without_plain_sgd(task, examples):
    runtime = model_runtime(task)
    runtime.reset({})
    keys = list(_live(runtime.model))
    scaffold = DriftSettings(proximal_mu=0.0, scaffold=True)
    control = {k: torch.full(p.shape, 0.5) for k, p in _live(runtime.model).items()}
    hp = TrainSettings.parse({**task["train"], "optimizer": "adamw"})
    adamw, _ = training.local_round(runtime.model, hp, len(examples))
    with pytest.raises(ConfigError, match="train.optimizer=sgd"):
        drift.start_round(runtime.model, keys, scaffold, control, RecordDict(), adamw)
    with pytest.raises(ConfigError, match="client_opt.scaffold=false"):
        drift.start_round(runtime.model, keys, DriftSettings(), control, RecordDict(), adamw)
    state = RecordDict()
    for _ in range(2):
        optimizer = torch.optim.SGD(trainable(runtime.model), lr=0.1)
        correction = drift.start_round(runtime.model, keys, scaffold, control, state, optimizer)
        zeros = {k: torch.zeros_like(v) for k, v in control.items()}
        held = drift.held_control(state, keys) or zeros
        torch.testing.assert_close(correction.shift[keys[0]], control[keys[0]] - held[keys[0]])
        training.train_steps(
            runtime.model,
            examples,
            optimizer,
            steps=2,
            batch_size=8,
            pad_token_id=runtime.tokenizer.pad_token_id,
            device=CPU,
            seed=0,
        )
        sent = drift.finish_round(correction, control, state)
        assert set(sent) == {f"control.{k}" for k in keys}
        now = drift.held_control(state, keys)
        for k in keys:
            torch.testing.assert_close(now[k], held[k] + sent[f"control.{k}"])
    assert drift.held_control(RecordDict(), keys) is None  # a restarted node: c_k = 0
