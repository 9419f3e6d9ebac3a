import pytest
import torch

from fedpeft import adapters, models, training
from fedpeft.errors import ConfigError
from tests.conftest import TINY


def _examples(n=64):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        label = i % 2
        ids = [101] + [
            2000 + label * 500 + int(x) for x in torch.randint(0, 50, (10,), generator=g)
        ]
        out.append({"input_ids": ids + [102], "attention_mask": [1] * 12, "label": label})
    return out


def test_macro_f1_matches_hand_computation():
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    gold = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp1 p2 g2 -> 0.5; class 1: tp2 p2 g3 -> 0.8; class 2: tp1 p2 g1 -> 2/3
    assert training.macro_f1(pred, gold, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_planned_steps():
    assert training.planned_steps(100, 16, 7, None) == 7
    assert training.planned_steps(100, 16, None, 1.0) == 7
    assert training.planned_steps(100, 16, 7, 0.5) == 4
    with pytest.raises(ConfigError, match="local_steps"):
        training.planned_steps(100, 16, 0, None)


def test_training_takes_exactly_the_steps_and_learns():
    torch.manual_seed(0)  # peft draws the LoRA init from the global generator
    base = models.load_model(models.ModelSpec.from_config(TINY, 2), seed=0)
    model = adapters.inject(base, adapters.AdapterSpec("lora", 4, 8.0, ("query", "value")))
    examples = _examples()
    kw = dict(batch_size=64, pad_token_id=0, device=torch.device("cpu"), num_labels=2)
    before = training.evaluate(model, examples, **kw)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = training.make_optimizer(trainable, "adamw", 1e-2)
    result = training.train_steps(
        model,
        examples,
        opt,
        steps=40,
        batch_size=16,
        pad_token_id=0,
        device=torch.device("cpu"),
        seed=0,
        max_grad_norm=1.0,
    )
    assert result.steps == 40 and result.num_examples == 64
    after = training.evaluate(model, examples, **kw)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.9
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ConfigError, match="optimizer"):
        training.make_optimizer(trainable, "adam9", 1e-3)
