import json

import pytest

from fedpeft.config import compose_config
from fedpeft.data import load_text_dataset
from fedpeft.errors import DataError

CAUSAL = ["model=tiny_llama", "partition=iid"]


def test_gsm8k_reads_both_splits_as_prompt_response_pairs(data_dir):
    ds = load_text_dataset(compose_config([*CAUSAL, "dataset=gsm8k"]).dataset)
    assert (len(ds.train), len(ds.test)) == (7473, 1319)
    assert ds.train.column_names == ["prompt", "response"] and ds.num_labels == 0
    assert ds.test[0]["prompt"].startswith("Janet") and ds.test[0]["response"].endswith("#### 18")


def test_jsonl_file_is_split_by_test_fraction(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": f"what is {i} + 1?", "a": f"#### {i + 1}"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    overrides = [
        "dataset=jsonl",
        f"dataset.path={path}",
        "dataset.text_column=q",
        "dataset.label_column=a",
    ]
    ds = load_text_dataset(compose_config([*CAUSAL, *overrides]).dataset)
    assert (len(ds.train), len(ds.test)) == (16, 4)
    assert {r["prompt"] for r in ds.test} < {r["q"] for r in rows}


def test_jsonl_line_without_the_fields_names_them(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "only a prompt"}\n')
    cfg = compose_config([*CAUSAL, "dataset=jsonl", f"dataset.path={path}"])
    with pytest.raises(DataError, match=r"bad.jsonl:2 lacks string fields 'prompt' and 'response'"):
        load_text_dataset(cfg.dataset)
