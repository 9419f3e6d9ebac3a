"""4-bit and 8-bit tiny_llama bases (bitsandbytes on CPU): LoRA training and DP-SGD on them."""

import pytest
import torch

from fedpeft import adapters, models, training
from fedpeft.causal.encoding import collate
from fedpeft.causal.loss import sequence_losses
from fedpeft.errors import ConfigError
from fedpeft.privacy.dp_sgd import train_private
from tests.conftest import train_settings

pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


def _spec(quantization: str, **extra) -> models.ModelSpec:
    cfg = {"name": "tiny_llama", "quantization": quantization, **extra}
    return models.ModelSpec.from_config(cfg, 0, "causal_lm")


def _lora(quantization: str, kind: str = "lora") -> adapters.PeftModel:
    base = models.load_model(_spec(quantization), seed=0, device=CPU)
    model = adapters.inject(base, adapters.AdapterSpec(kind, 4, 8.0, ("q_proj", "v_proj"), False))
    adapters.write_adapter(model, adapters.initial_adapter(model, 0))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for layer in adapters.lora_layers(model).values():
            weight = adapters.factor_weight(layer, "lora_B")
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


def test_4bit_base_is_nf4_with_double_quantisation_and_close_to_the_float_base(tokenizer):
    import bitsandbytes as bnb

    spec = _spec("4bit", compute_dtype="bfloat16")
    quantised = models.load_model(spec, seed=0, device=CPU)
    plain = models.load_model(_spec("none"), seed=0)
    layer = quantised.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state.quant_type == "nf4" and layer.compute_dtype == torch.bfloat16
    assert layer.weight.quant_state.nested  # double quantisation of the absmax statistics
    assert quantised.model.norm.weight.dtype == torch.float32  # peft's k-bit preparation
    assert quantised.get_memory_footprint() < plain.get_memory_footprint()
    ids = torch.tensor([tokenizer("Tom has 3 apples and buys 4 more.")["input_ids"]])
    with torch.no_grad():
        q, p = quantised(ids, labels=ids).loss, plain(ids, labels=ids).loss
    assert abs(float(q) - float(p)) < 0.05 * float(p)
    again = models.load_model(spec, seed=0, device=CPU).model.layers[0].self_attn.q_proj
    assert torch.equal(again.weight, layer.weight)  # same seed, same quantised weights


def test_8bit_base_holds_int8_weights():
    import bitsandbytes as bnb

    model = models.load_model(_spec("8bit"), seed=0, device=CPU)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8


def test_missing_bitsandbytes_and_a_classifier_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match=r"model.quantization=4bit quantises causal-LM bases"):
        models.ModelSpec.from_config({"name": "tiny_bert", "quantization": "4bit"}, 2)
    with pytest.raises(ConfigError, match=r"model.quantization='2bit' is unknown"):
        _spec("2bit")
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*pip install 'fedpeft\[quant\]'"):
        _spec("4bit")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_lora_on_a_quantised_base_trains_float32_factors(quantization, examples, tokenizer):
    model = _lora(quantization)
    factors = adapters.adapter_tensors(model)
    assert {v.dtype for v in factors.values()} == {torch.float32}
    with torch.no_grad():  # evaluation first, as the server's evaluator does in its process
        model.eval()
        model(**{k: v for k, v in collate(examples, tokenizer.pad_token_id).items()})
    before = {k: v.detach().clone() for k, v in factors.items()}
    optimizer, _ = training.local_round(
        model, train_settings(lr=1e-2, batch_size=4, local_steps=6), len(examples)
    )
    result = training.train_steps(
        model,
        examples,
        optimizer,
        steps=6,
        batch_size=4,
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        seed=0,
    )
    assert result.steps == 6
    assert all(not torch.equal(before[k], v) for k, v in factors.items())
    base = adapters.base_weights(model)
    assert all(not w.requires_grad for w in base.values())


def test_dp_sgd_on_a_4bit_base_clips_each_example_exactly(examples, tokenizer):
    """One noiseless DP-SGD step equals the mean of per-example clipped gradients (float64)."""
    clip = 0.05
    reference = _lora("4bit")
    trainable = [p for p in reference.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in trainable]
    for example in examples:
        batch = collate([example], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        grads = torch.autograd.grad(
            sequence_losses(reference(**batch).logits, labels).mean(), trainable
        )
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for acc, g in zip(total, grads, strict=True):
            acc += g.double() * factor
    expected = [-acc / len(examples) for acc in total]  # SGD, lr 1

    model = _lora("4bit")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    train_private(
        model,
        examples,
        torch.optim.SGD(params, lr=1.0),
        steps=1,
        sample_rate=1.0,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        seed=0,
    )
    for p, b, e in zip(params, before, expected, strict=True):
        torch.testing.assert_close((p.detach() - b).double(), e, rtol=1e-4, atol=1e-7)
