import torch

from fedpeft.causal.generation import greedy_generate, left_pad


def test_left_pad_aligns_prompt_ends():
    batch = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_generation_matches_one_prompt_at_a_time(lora_model, tokenizer, examples):
    prompts = [ex["input_ids"][: ex["prompt_length"]] for ex in examples]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    kw = {"max_new_tokens": 6, "device": torch.device("cpu")}
    batched = greedy_generate(lora_model, tokenizer, prompts, batch_size=4, **kw)
    alone = [greedy_generate(lora_model, tokenizer, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == alone and all(batched)
