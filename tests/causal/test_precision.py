"""train.precision (autocast) and train.gradient_checkpointing on tiny_llama, and their refusals."""

import pytest
import torch

from fedpeft import adapters, training
from fedpeft.causal.encoding import collate
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from tests.conftest import train_settings

CPU = torch.device("cpu")
GSM8K = ["model=tiny_llama", "dataset=gsm8k", "partition=iid"]


def _grads(model, examples, pad_token_id):
    batch = collate(examples, pad_token_id)
    model.train()
    with training.autocast(model, CPU):
        out = model(**batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, trainable)


def test_checkpointing_gives_the_same_gradients_and_switches_per_round(lora_model, examples):
    base = lora_model.get_base_model()
    training.prepare_round(lora_model, gradient_checkpointing=False)
    _, plain = _grads(lora_model, examples, 0)
    training.prepare_round(lora_model, gradient_checkpointing=True)
    assert base.is_activation_checkpointing
    _, recomputed = _grads(lora_model, examples, 0)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    training.prepare_round(lora_model)
    assert not base.is_activation_checkpointing


def test_bf16_autocasts_the_forward_and_keeps_float32_factors(lora_model, examples, tokenizer):
    training.prepare_round(lora_model, "fp32")
    ref, ref_grads = _grads(lora_model, examples, tokenizer.pad_token_id)
    training.prepare_round(lora_model, "bf16")
    out, grads = _grads(lora_model, examples, tokenizer.pad_token_id)
    assert ref.logits.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    assert abs(float(out.loss) - float(ref.loss)) < 0.02 * float(ref.loss)
    assert {g.dtype for g in grads} == {torch.float32}
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads]), 0
    )
    assert cos > 0.99
    factors = adapters.adapter_tensors(lora_model)
    before = {k: v.detach().clone() for k, v in factors.items()}
    hp = train_settings(lr=1e-2, batch_size=2, local_steps=3, precision="bf16")
    optimizer, steps = training.local_round(lora_model, hp, len(examples))
    result = training.train_steps(
        lora_model,
        examples,
        optimizer,
        steps=steps,
        batch_size=2,
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        seed=0,
        max_grad_norm=1.0,
    )
    assert result.steps == 3 and {v.dtype for v in factors.values()} == {torch.float32}
    assert any(not torch.equal(before[k], v) for k, v in factors.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["++train.precision=fp8"], r"train.precision=fp8 is unknown"),
        (["++train.precision=fp16"], r"train.precision asks for float16, a GPU precision"),
        (["++train.gradient_checkpointing=yes"], r"train.gradient_checkpointing=yes must be"),
        (["dp=eps3", "++train.gradient_checkpointing=true"], r"dp with train.gradient_checkp"),
        (["dp=eps3", "++train.precision=bf16"], r"dp with train.precision=bf16"),
        (["model.quantization=4bit", "strategy=flora"], r"flora on a 4bit base: it merges"),
        (["model.quantization=4bit", "strategy=fedex_lora"], r"fedex_lora on a 4bit base: it"),
        (["model.quantization=8bit", "strategy=fed_sb"], r"fed_sb on a 8bit base: its LoRA-SB"),
        (["model.quantization=4bit", "model.compute_dtype=float16"], r"model.compute_dtype"),
    ],
)
def test_combinations_that_cannot_be_exact_are_refused(overrides, message):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError, match=message):
        compose_config([*GSM8K, "device=cpu", *overrides])


def test_what_stays_allowed_composes():
    pytest.importorskip("bitsandbytes")
    for extra in (
        ["model.quantization=4bit", "dp=eps3"],
        ["model.quantization=8bit", "strategy=fed_sb", "strategy.params.init=orthonormal"],
        ["++train.precision=bf16", "++train.gradient_checkpointing=true", "strategy=flora"],
    ):
        compose_config([*GSM8K, "device=cpu", *extra])


def test_opacus_really_breaks_under_recomputation(lora_model, examples, tokenizer):
    """Why DP refuses checkpointing: Opacus' hooks mode fails on a recomputed forward."""
    from fedpeft.privacy.dp_sgd import train_private

    training.prepare_round(lora_model, gradient_checkpointing=True)
    params = [p for p in lora_model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="Per sample gradient is not initialized"):
        train_private(
            lora_model,
            examples,
            torch.optim.SGD(params, lr=1.0),
            steps=1,
            sample_rate=1.0,
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            pad_token_id=tokenizer.pad_token_id,
            device=CPU,
            seed=0,
        )
