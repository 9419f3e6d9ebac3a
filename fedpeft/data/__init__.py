"""Data sources, federated partitioning and tokenisation for text classification.

Every source yields a `TextDataset`: a train split (partitioned over clients) and a held-out test
split (kept by the server), both with exactly the columns ``text`` (str) and ``label`` (int64
ClassLabel). `load_text_dataset` reads one (`sources`), `partition_dataset` deals its train split
out to clients (`partition`) and `tokenize`/`collate` turn examples into model inputs (`encoding`).
"""

from fedpeft.data.encoding import collate, tokenize
from fedpeft.data.locations import cache_dir, data_root
from fedpeft.data.partition import partition_dataset, partition_sizes
from fedpeft.data.sources import load_text_dataset
from fedpeft.data.spamassassin import spamassassin_archive
from fedpeft.data.text_dataset import TextDataset

__all__ = [
    "TextDataset",
    "cache_dir",
    "collate",
    "data_root",
    "load_text_dataset",
    "partition_dataset",
    "partition_sizes",
    "spamassassin_archive",
    "tokenize",
]
