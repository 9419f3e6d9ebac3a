"""tiny_llama with a LoRA on q_proj/v_proj and a few encoded GSM8K-style pairs."""

import pytest
import torch

from fedpeft import adapters, models
from fedpeft.causal.encoding import encode_pair

PAIRS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
    ("1 + 1?", "#### 2"),
    ("A box holds 12 eggs. How many eggs are in 3 boxes?", "12 * 3 = 36 eggs.\n#### 36"),
    ("What is 10 - 4?", "10 - 4 = 6\n#### 6"),
]


@pytest.fixture(scope="module")
def spec():
    return models.ModelSpec.from_config({"name": "tiny_llama"}, 0)


@pytest.fixture(scope="module")
def tokenizer(spec):
    return models.load_tokenizer(spec)


@pytest.fixture
def lora_model(spec):
    """A fresh tiny_llama with LoRA factors of nonzero B, so the adapter changes the output."""
    model = adapters.inject(
        models.load_model(spec, seed=0), adapters.AdapterSpec("lora", 4, 8.0, ("q_proj", "v_proj"))
    )
    with torch.no_grad():
        for layer in adapters.lora_layers(model).values():
            torch.nn.init.normal_(adapters.factor_weight(layer, "lora_B"), std=0.1)
    return model


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [encode_pair(tokenizer, p, r, max_length=64) for p, r in PAIRS]
