"""DP-SGD on a causal LM: Opacus clips one per-sequence loss gradient per example."""

import pytest
import torch

from fedpeft import adapters
from fedpeft.causal.encoding import collate
from fedpeft.causal.loss import sequence_losses
from fedpeft.privacy.dp_sgd import train_private


def _one_step(model, examples, tokenizer, mode, clip):
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    train_private(
        model,
        examples,
        torch.optim.SGD(trainable, lr=1.0),
        steps=1,
        sample_rate=0.99,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        pad_token_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
        seed=3,
        grad_sample_mode=mode,
    )
    return [p.detach() - b for p, b in zip(trainable, before, strict=True)]


def _clipped_mean_update(model, examples, tokenizer, clip, expected_batch):
    """-(sum_i clip(grad of sequence i's mean loss)) / expected batch, by hand."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in trainable]
    for ex in examples:
        batch = collate([ex], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        loss = sequence_losses(model(**batch).logits, labels).sum()
        grads = torch.autograd.grad(loss, trainable)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + g * scale for t, g in zip(total, grads, strict=True)]
    return [-t / expected_batch for t in total]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_private_step_clips_each_sequence(mode, lora_model, tokenizer, examples):
    state = adapters.read_adapter(lora_model, adapters.adapter_tensors(lora_model))
    clip = 0.05  # small enough to bind for every sequence
    # seed 3 at rate 0.99 draws all four examples (checked against the by-hand update below)
    expected = _clipped_mean_update(lora_model, examples, tokenizer, clip, expected_batch=4)
    adapters.write_adapter(lora_model, state)
    update = _one_step(lora_model, examples, tokenizer, mode, clip)
    for got, want in zip(update, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
