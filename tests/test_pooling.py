"""Mean pooling for BERT classifiers: the masked mean, blind to padding, refused where unknown."""

import pytest
import torch

from fedpeft import models
from fedpeft.errors import ConfigError
from fedpeft.pooling import MeanPooler, use_mean_pooling


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_mean_pooler_is_the_masked_mean_in_float64(scale):
    g = torch.Generator().manual_seed(0)
    states = scale * torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])
    pooler = MeanPooler()
    pooler.mask = mask
    expected = torch.stack([states[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(pooler(states), expected, rtol=1e-12, atol=0)


def test_a_mean_pooled_tiny_bert_reads_the_token_states_and_ignores_padding(data_dir):
    spec = models.ModelSpec.from_config({"name": "tiny_bert", "pooling": "mean"}, num_labels=3)
    model = models.load_model(spec, seed=0).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        long = model(input_ids=padded, attention_mask=mask).logits
        states = model.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short, model.classifier(states.mean(1)), rtol=1e-5, atol=1e-6)
    cls = models.load_model(models.ModelSpec.from_config({"name": "tiny_bert"}, 3), seed=0).eval()
    with torch.no_grad():
        assert not torch.allclose(cls(input_ids=ids).logits, short)  # the pooler was replaced


def test_unknown_pooling_and_pooling_without_a_bert_pooler_are_refused():
    with pytest.raises(ConfigError, match="model.pooling='max' is unknown: choose one of cls"):
        models.ModelSpec.from_config({"name": "minilm", "pooling": "max"}, num_labels=2)
    # a causal LM pools nothing: the setting (which the dp presets make for every model) is moot
    assert (
        models.ModelSpec.from_config({"name": "tiny_llama", "pooling": "mean"}, 0).pooling == "cls"
    )
    with pytest.raises(ConfigError, match="needs a BERT-style classifier"):
        use_mean_pooling(torch.nn.Linear(2, 2))
