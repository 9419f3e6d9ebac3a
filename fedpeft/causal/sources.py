"""Former home of the prompt/response readers, now fedpeft.data.prompt_pairs (the layering's place).

Kept so that `from fedpeft.causal.sources import read_pairs` (clients/client_data.py) still works.
"""

from fedpeft.data.prompt_pairs import prompt_dataset, read_gsm8k, read_jsonl, read_pairs, split

__all__ = ["prompt_dataset", "read_gsm8k", "read_jsonl", "read_pairs", "split"]
