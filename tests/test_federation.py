"""Server-side preparation: the full-weight gradients Fed-SB's LoRA-SB start is computed from."""

import pytest
import torch

from fedpeft import adapters, tasks
from fedpeft.config import compose_config
from fedpeft.federation import (
    DEPLOYED_NORM_BOUND,
    build_task,
    gradient_groups,
    layer_gradients,
    reply_norm_bound,
)
from fedpeft.runtime import model_runtime
from tests.conftest import FAST_RUN


@pytest.fixture(scope="module")
def runtime_and_examples(data_dir):
    from fedpeft import data

    cfg = compose_config(FAST_RUN)
    source = data.load_text_dataset(cfg.dataset, seed=cfg.seed)
    runtime = model_runtime(build_task(cfg, 2, source.label_names))
    examples = tasks.encode(cfg.task, source.test.select(range(10)), runtime.tokenizer, 32)
    return runtime, examples


def _reference(runtime, examples):
    """Every adapted layer's gradient of the mean loss, from one backward over one batch."""
    weights = adapters.base_weights(runtime.model)
    runtime.reset({})
    runtime.model.eval()
    for weight in weights.values():
        weight.requires_grad_(True)
    batch = tasks.collate(examples, runtime.tokenizer.pad_token_id)
    runtime.model(**batch).loss.backward()
    grads = {name: w.grad.detach().clone() for name, w in weights.items()}
    for weight in weights.values():
        weight.grad = None
        weight.requires_grad_(False)
    return grads


def test_groups_fill_the_budget_and_keep_a_big_layer_alone():
    weights = {n: torch.zeros(10, 10) for n in "abcd"}  # 400 bytes each
    assert gradient_groups(weights, 800) == [["a", "b"], ["c", "d"]]
    assert gradient_groups(weights, 100) == [["a"], ["b"], ["c"], ["d"]]
    assert gradient_groups(weights, 10**9) == [["a", "b", "c", "d"]]


@pytest.mark.parametrize("budget", [1, 10**9])  # a layer per pass; every layer in one pass
def test_layer_gradients_are_the_full_gradients_in_few_passes(runtime_and_examples, budget):
    runtime, examples = runtime_and_examples
    expected = _reference(runtime, examples)
    calls = []
    hook = runtime.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = dict(layer_gradients(runtime, examples, batch_size=4, budget=budget))
    finally:
        hook.remove()
    assert list(got) == list(expected) and len(expected) == 4
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7)
    batches = 3  # 10 examples in batches of 4
    assert len(calls) == batches * (len(expected) if budget == 1 else 1)
    assert all(not w.requires_grad for w in adapters.base_weights(runtime.model).values())


def test_a_deployment_bounds_reply_norms_by_default_and_a_simulation_does_not(data_dir):
    cfg = compose_config(FAST_RUN)
    assert reply_norm_bound(cfg, deployed=False) is None
    assert reply_norm_bound(cfg, deployed=True) == DEPLOYED_NORM_BOUND == 100.0
    assert reply_norm_bound(compose_config([*FAST_RUN, "replies.norm_bound=5"]), True) == 5.0
    # an honest deployed reply fits with room to spare: the initial tensors' largest norm
    runtime = model_runtime(build_task(cfg, 2))
    largest = max(float(t.norm()) for t in runtime.initial.values())
    assert largest < DEPLOYED_NORM_BOUND / 10
