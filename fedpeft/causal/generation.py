"""Batched greedy generation from left-padded prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts padded on the left, so every row's next token is generated at the same position."""
    width = max(len(p) for p in prompts)
    ids = [[pad_token_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """The decoded greedy continuation of every prompt (prompt ids in, new text out, in order).

    Prompts are batched by length to pad little; generation stops at the tokenizer's eos token.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {
            k: v.to(device)
            for k, v in left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id).items()
        }
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :].cpu()
        for i, row in zip(chunk, new, strict=True):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return texts
