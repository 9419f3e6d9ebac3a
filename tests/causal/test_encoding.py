import pytest
import torch

from fedpeft import models
from fedpeft.causal.encoding import IGNORE, collate, encode_pair

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
ANSWER = "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(models.ModelSpec.from_config({"name": "tiny_llama"}, 0))


def test_loss_falls_on_response_tokens_only(tokenizer):
    ex = encode_pair(tokenizer, QUESTION, ANSWER, max_length=512)
    n = ex["prompt_length"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(ex["input_ids"][:n]) == tokenizer.decode(
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    assert ex["labels"][:n] == [IGNORE] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["labels"][-1] == tokenizer.eos_token_id  # the model learns to stop
    assert "# # # # 7" in tokenizer.decode(ex["labels"][n:])
    assert ex["answer"] == "7"


def test_truncation_keeps_the_prompt_end_and_the_response_start(tokenizer):
    full = encode_pair(tokenizer, QUESTION, ANSWER, max_length=512)
    short = encode_pair(tokenizer, QUESTION, ANSWER, max_length=20)
    assert len(short["input_ids"]) == 20 and short["prompt_length"] == 10
    n = full["prompt_length"]
    assert short["input_ids"][:10] == full["input_ids"][n - 10 : n]
    assert short["input_ids"][10:] == full["input_ids"][n : n + 10]


def test_collate_pads_right_with_ignored_labels(tokenizer):
    a = encode_pair(tokenizer, QUESTION, ANSWER, 512)
    b = encode_pair(tokenizer, "1 + 1?", "#### 2", 512)
    batch = collate([a, b], pad_token_id=tokenizer.pad_token_id)
    width = len(a["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    k = len(b["input_ids"])
    assert torch.equal(batch["labels"][1, k:], torch.full((width - k,), IGNORE))
    assert batch["attention_mask"][1].sum() == k
    assert (batch["input_ids"][1, k:] == tokenizer.pad_token_id).all()
