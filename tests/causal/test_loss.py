import pytest
import torch

from fedpeft.causal.encoding import collate
from fedpeft.causal.loss import private_loss, sequence_losses


def test_sequence_losses_average_each_sequence_over_its_response_tokens(
    lora_model, tokenizer, examples
):
    batch = collate(examples, tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        losses = sequence_losses(lora_model(**batch).logits, labels)
        alone = [lora_model(**collate([ex], tokenizer.pad_token_id)).loss for ex in examples]
    assert losses.shape == (len(examples),)
    assert torch.allclose(losses, torch.stack(alone), atol=1e-5)


def test_private_loss_is_the_mean_of_sequence_means_not_the_token_mean(
    lora_model, tokenizer, examples
):
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        token_mean = lora_model(**batch).loss
        labels = batch.pop("labels")
        logits = lora_model(**batch).logits
    per_sequence = private_loss(logits, labels)
    assert per_sequence == pytest.approx(float(sequence_losses(logits, labels).mean()))
    # sequences have different response lengths, so the two reductions differ
    assert abs(float(per_sequence) - float(token_mean)) > 1e-4
