"""Prompt/response sources: GSM8K (question/answer JSONL) and any JSONL with two text fields.

Both yield a `TextDataset` whose splits have the columns ``prompt`` and ``response`` and no labels
(label_names is empty), which the causal-LM encoding turns into model inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from fedpeft.data.spec import DatasetSpec
from fedpeft.errors import DataError

Splits = tuple[datasets.Dataset, datasets.Dataset | None, list[str]]


def prompt_dataset(prompts: list[str], responses: list[str]) -> datasets.Dataset:
    """A split with the columns prompt and response, dropping rows where either is empty."""
    rows = [(p.strip(), r.strip()) for p, r in zip(prompts, responses, strict=True)]
    rows = [(p, r) for p, r in rows if p and r]
    return datasets.Dataset.from_dict(
        {"prompt": [p for p, _ in rows], "response": [r for _, r in rows]}
    )


def read_pairs(path: Path, prompt_field: str, response_field: str, hint: str) -> datasets.Dataset:
    """Read one JSONL file of objects holding `prompt_field` and `response_field` strings."""
    if not path.is_file():
        raise DataError(f"{path} not found: {hint}")
    prompts, responses = [], []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{number} is not a JSON object ({err}): {hint}") from err
            if not isinstance(row, dict) or not all(
                isinstance(row.get(f), str) for f in (prompt_field, response_field)
            ):
                raise DataError(
                    f"{path}:{number} lacks string fields {prompt_field!r} and "
                    f"{response_field!r}: {hint}"
                )
            prompts.append(row[prompt_field])
            responses.append(row[response_field])
    ds = prompt_dataset(prompts, responses)
    if len(ds) == 0:
        raise DataError(f"{path} holds no prompt/response pairs: {hint}")
    return ds


def read_gsm8k(spec: DatasetSpec) -> Splits:
    """GSM8K's train.jsonl and test.jsonl: prompt = question, response = the worked answer."""
    root = Path(spec.location)
    hint = f"dataset.path={root} must hold GSM8K's train.jsonl and test.jsonl (question, answer)"
    train = read_pairs(root / "train.jsonl", "question", "answer", hint)
    return train, read_pairs(root / "test.jsonl", "question", "answer", hint), []


def read_jsonl(spec: DatasetSpec) -> Splits:
    """A JSONL file (split by test_fraction) or a folder with train.jsonl and test.jsonl.

    The prompt and response fields are dataset.text_column and dataset.label_column.
    """
    root = Path(spec.location)
    fields = (spec.text_column, spec.label_column)
    hint = (
        f"dataset.path={root} must be a .jsonl file or a folder with train.jsonl and test.jsonl, "
        f"each line an object with {fields[0]!r} and {fields[1]!r} (dataset.text_column and "
        "dataset.label_column name them)"
    )
    if root.is_dir():
        test = root / "test.jsonl"
        return (
            read_pairs(root / "train.jsonl", *fields, hint),
            read_pairs(test, *fields, hint) if test.is_file() else None,
            [],
        )
    return read_pairs(root, *fields, hint), None, []


def split(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, ...]:
    """A seeded train/test split of a prompt/response set."""
    if len(ds) < 2:
        raise DataError(f"only {len(ds)} prompt/response pair(s): too few to split off a test set")
    parts = ds.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
