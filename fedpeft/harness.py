"""lm-evaluation-harness on a causal run's adapter, from local data files only (`fedpeft evaluate`).

lm-eval's task definitions are used as they are, with one change: the data come from local files
(`<data_dir>/<task>/<split>.jsonl`, or .json, .csv, .parquet), never from the hub. `gsm8k` is
lm-eval's own GSM8K task (5-shot, its prompt and its strict/flexible answer extraction).
`gsm8k_fedpeft` is the federation's own evaluation stated as an lm-eval task: zero-shot, the
question in the model's chat template, greedy decoding up to `max_new_tokens` until eos, and exact
match of the final number (fedpeft.causal.answers.final_number), so that lm-eval reproduces the
per-round `exact_match` of the run on the same problems.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedpeft.causal.answers import final_number
from fedpeft.errors import ConfigError
from fedpeft.extras import require

FEDPEFT_GSM8K = "gsm8k_fedpeft"
#: the lm-eval task whose definition (and local data folder) a fedpeft task borrows
BORROWS = {FEDPEFT_GSM8K: "gsm8k"}
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
RESULTS_FILE = "lm_eval_results.json"
SAMPLES_FILE = "lm_eval_samples.json"
INVALID = "[invalid]"


class _Function(str):
    """A `!function module.name` reference in an lm-eval YAML (lm-eval imports it)."""


class _Dumper(yaml.SafeDumper):
    """YAML dumper that writes `_Function` values with lm-eval's `!function` tag."""


_Dumper.add_representer(_Function, lambda dumper, v: dumper.represent_scalar("!function", v))


def final_numbers(resps: Iterable[Sequence[str]], docs: Sequence[dict]) -> list[list[str]]:
    """lm-eval filter: every response's final number, as the federation's exact match reads it."""
    return [[final_number(r) or INVALID for r in group] for group in resps]


def gold_number(doc: Mapping[str, Any]) -> str:
    """lm-eval target: the final number of the reference answer ("" when it has none)."""
    return final_number(str(doc["answer"])) or ""


@functools.lru_cache(maxsize=1)
def _default_tasks() -> Any:
    """lm-eval's index of its own tasks (scanning its ~15k task YAMLs takes seconds: once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _local_tasks(include_path: str) -> Any:
    """An index of the YAMLs fedpeft wrote (they include lm-eval's by absolute path)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=False)


def _base_config(name: str) -> tuple[Path, dict[str, Any]]:
    """The YAML file and merged config (includes followed, functions unresolved) of a task."""
    from lm_eval.tasks._yaml_loader import load_yaml

    own = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / name / f"{name}.yaml"
    if own.is_file():  # lm-eval's layout for most of its tasks: no need to index them all
        config = load_yaml(own, resolve_func=False)
        if config.get("task") == name:
            return own, config
    entry = _default_tasks().task_index.get(name)
    if entry is None:
        raise ConfigError(
            f"tasks={name} is not an lm-eval task: name tasks lm-eval knows (e.g. gsm8k) or "
            f"{FEDPEFT_GSM8K}"
        )
    if entry.kind.name != "TASK" or entry.yaml_path is None:
        raise ConfigError(
            f"tasks={name} is an lm-eval {entry.kind.name.lower().replace('_', ' ')}, not a "
            "single YAML task: name its tasks one by one, each with its data in a local folder"
        )
    return Path(entry.yaml_path), load_yaml(entry.yaml_path, resolve_func=False)


def local_data_files(
    name: str, config: Mapping[str, Any], folder: Path, num_fewshot: int
) -> tuple[str, dict[str, str]]:
    """The datasets builder and {split: file} of a task's splits found in `folder`.

    The evaluated split (test, else validation) must be there, and so must the few-shot split
    when `num_fewshot` > 0; otherwise the task's data is not local and nothing is downloaded.
    """
    files: dict[str, str] = {}
    for key in SPLIT_KEYS:
        split = config.get(key)
        if not split or split in files:
            continue
        for suffix in BUILDERS:
            path = folder / f"{split}{suffix}"
            if path.is_file():
                files[split] = str(path)
                break
    evaluated = config.get("test_split") or config.get("validation_split")
    fewshot = config.get("fewshot_split") or config.get("training_split")
    needed = [evaluated] + ([fewshot] if num_fewshot > 0 and fewshot else [])
    missing = [s for s in needed if s and s not in files]
    if missing or not evaluated:
        raise ConfigError(
            f"tasks={name}: its data is not local (no {missing[0] if missing else 'test'} split "
            f"in {folder}): put {', '.join(f'{s}.jsonl' for s in needed if s)} there, or pass "
            f"data_dir=<folder holding {folder.name}/>"
        )
    builders = {BUILDERS[Path(f).suffix] for f in files.values()}
    if len(builders) > 1:
        raise ConfigError(
            f"tasks={name}: the split files in {folder} mix formats ({sorted(builders)}): use "
            "one format (.jsonl, .csv or .parquet) for all of them"
        )
    return builders.pop(), files


def task_configs(
    names: Sequence[str],
    data_dir: Path,
    out_dir: Path,
    *,
    num_fewshot: int | None,
    max_new_tokens: int | None,
    gsm8k_path: Path | None = None,
    run_max_new_tokens: int = 256,
) -> dict[str, int]:
    """Write one YAML per task into `out_dir` (an lm-eval include path); {task: num_fewshot}.

    Each includes lm-eval's own definition and replaces only its data source (and, for
    gsm8k_fedpeft, its prompt, generation and scoring; it generates `max_new_tokens`, else the
    run's `run_max_new_tokens`).
    """
    shots: dict[str, int] = {}
    for name in names:
        borrowed = BORROWS.get(name, name)
        yaml_path, config = _base_config(borrowed)
        override: dict[str, Any] = {"include": str(yaml_path), "task": name}
        if name == FEDPEFT_GSM8K:
            override.update(
                doc_to_text="{{question}}",
                doc_to_target=_Function("fedpeft.harness.gold_number"),
                num_fewshot=0,
                generation_kwargs={
                    "until": [],
                    "do_sample": False,
                    "max_gen_toks": max_new_tokens or run_max_new_tokens,
                },
                filter_list=[
                    {
                        "name": "final-number",
                        "filter": [
                            {
                                "function": "custom",
                                "filter_fn": _Function("fedpeft.harness.final_numbers"),
                            },
                            {"function": "take_first"},
                        ],
                    }
                ],
                metric_list=[
                    {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
                ],
            )
        elif max_new_tokens is not None:
            kwargs = dict(config.get("generation_kwargs") or {})
            override["generation_kwargs"] = {**kwargs, "max_gen_toks": max_new_tokens}
        shot = 0 if name == FEDPEFT_GSM8K else num_fewshot
        shot = int(shot if shot is not None else config.get("num_fewshot") or 0)
        folder = gsm8k_path if borrowed == "gsm8k" and gsm8k_path else data_dir / borrowed
        builder, files = local_data_files(name, config, folder, shot)
        override.update(dataset_path=builder, dataset_name=None)
        for key in SPLIT_KEYS:  # splits without a local file are not needed: unset them
            if config.get(key) and config[key] not in files:
                override[key] = None
        override["dataset_kwargs"] = {"data_files": files}
        text = yaml.dump(override, Dumper=_Dumper, sort_keys=False)
        (out_dir / f"{name}.yaml").write_text(text)
        shots[name] = shot
    return shots


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: Path,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    max_new_tokens: int | None = None,
    chat: bool = False,
    gsm8k_path: Path | None = None,
    run_max_new_tokens: int = 256,
) -> dict[str, Any]:
    """lm-eval's simple_evaluate of `model` (a peft or plain causal LM) on local-data tasks.

    Returns lm-eval's result dict (results, configs, versions, n-shot, samples). gsm8k_fedpeft
    always runs with the chat template; other tasks with it when `chat`.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)
    merged: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-lmeval-") as tmp:
        shots = task_configs(
            tasks,
            data_dir,
            Path(tmp),
            num_fewshot=num_fewshot,
            max_new_tokens=max_new_tokens,
            gsm8k_path=gsm8k_path,
            run_max_new_tokens=run_max_new_tokens,
        )
        manager = _local_tasks(tmp)
        for name in tasks:
            result = simple_evaluate(
                model=lm,
                tasks=[name],
                num_fewshot=shots[name],
                limit=limit,
                task_manager=manager,
                apply_chat_template=chat or name == FEDPEFT_GSM8K,
                log_samples=True,
                bootstrap_iters=0,
            )
            if result is None:
                raise ConfigError(f"lm-eval returned no result for tasks={name}")
            for key, value in result.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key].update(value)
                else:
                    merged.setdefault(key, value)
    return merged


def write_results(result: Mapping[str, Any], run_dir: Path) -> Path:
    """lm-eval's JSON result beside summary.json (per-sample records in a second file)."""
    from lm_eval.utils import handle_non_serializable

    summary = {k: v for k, v in result.items() if k != "samples"}
    path = run_dir / RESULTS_FILE
    path.write_text(json.dumps(summary, indent=2, default=handle_non_serializable))
    if "samples" in result:
        (run_dir / SAMPLES_FILE).write_text(
            json.dumps(result["samples"], indent=2, default=handle_non_serializable)
        )
    return path


OPTIONS = {
    "tasks": "comma-separated lm-eval tasks, e.g. gsm8k,gsm8k_fedpeft",
    "limit": "evaluate the first N problems of each task",
    "batch_size": "generation batch size",
    "num_fewshot": "few-shot examples (default: the task's own)",
    "max_new_tokens": "longest generation (default: the task's; gsm8k_fedpeft: the run's)",
    "data_dir": "folder holding <task>/<split>.jsonl (default: $FEDPEFT_DATA_DIR)",
    "chat": "true: prompt through the model's chat template (gsm8k_fedpeft always does)",
    "device": "auto, cpu, cuda or cuda:N (default: the run's)",
}


def parse_options(args: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments of `fedpeft evaluate`; an unknown key names the known ones."""
    options: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise ConfigError(
                f"fedpeft evaluate: {arg!r} is not key=value with a known key: use "
                + ", ".join(f"{k}=" for k in OPTIONS)
            )
        options[key] = value
    if not options.get("tasks"):
        raise ConfigError("fedpeft evaluate needs tasks=<lm-eval tasks>, e.g. tasks=gsm8k")
    return options


def _int_option(options: Mapping[str, str], key: str) -> int | None:
    if key not in options:
        return None
    try:
        value = int(options[key])
    except ValueError:
        value = -1
    if value < (0 if key == "num_fewshot" else 1):
        raise ConfigError(f"{key}={options[key]} must be an integer >= 1 (num_fewshot: >= 0)")
    return value


def load_run_model(run_dir: Path, device_name: str | None = None) -> tuple[Any, Any, Any]:
    """The run's base, loaded as the run loaded it, with its saved adapter (and tokenizer, cfg)."""
    from omegaconf import OmegaConf
    from peft import PeftModel

    from fedpeft import models

    config, adapter = run_dir / "config.yaml", run_dir / "adapter"
    if not config.is_file() or not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"{run_dir} is not a finished run folder (no config.yaml and adapter/): pass the "
            "run_dir of a completed `fedpeft simulate` or `flwr run`"
        )
    cfg = OmegaConf.load(config)
    if cfg.get("task") != "causal_lm":
        raise ConfigError(
            f"{run_dir} is a {cfg.get('task')} run: fedpeft evaluate runs lm-eval on causal-LM "
            "runs (dataset=gsm8k or jsonl)"
        )
    spec = models.ModelSpec.from_config(cfg.model, 0, "causal_lm")
    device = models.resolve_device(device_name or cfg.get("device"))
    base = models.load_model(spec, seed=int(cfg.adapter.init_seed), device=device)
    if not spec.placed:
        base = base.to(device)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model, models.load_tokenizer(spec), cfg


def evaluate_run(run_dir: str | Path, args: Sequence[str]) -> dict[str, Any]:
    """`fedpeft evaluate <run_dir> tasks=...`: lm-eval on the run's adapter, JSON in the folder."""
    require("lm_eval", "fedpeft evaluate (lm-evaluation-harness)")
    run_dir = Path(run_dir)
    options = parse_options(args)
    tasks = [t.strip() for t in options["tasks"].split(",") if t.strip()]
    model, tokenizer, cfg = load_run_model(run_dir, options.get("device"))
    if "data_dir" in options:
        data_dir = Path(options["data_dir"]).expanduser()
        if not data_dir.is_dir():
            raise ConfigError(f"data_dir={data_dir} is not a folder: pass the folder of <task>/")
    elif os.environ.get("FEDPEFT_DATA_DIR"):
        data_dir = Path(os.environ["FEDPEFT_DATA_DIR"]).expanduser()
    else:
        raise ConfigError(
            "fedpeft evaluate reads each task's data from <data_dir>/<task>/: pass "
            "data_dir=<folder> or set FEDPEFT_DATA_DIR"
        )
    gsm8k_path = None
    if cfg.dataset.get("name") == "gsm8k" and cfg.dataset.get("path"):
        gsm8k_path = Path(cfg.dataset.path)
    result = evaluate_model(
        model,
        tokenizer,
        tasks,
        data_dir=data_dir,
        batch_size=_int_option(options, "batch_size") or int(cfg.eval.batch_size),
        limit=_int_option(options, "limit"),
        num_fewshot=_int_option(options, "num_fewshot"),
        max_new_tokens=_int_option(options, "max_new_tokens"),
        chat=options.get("chat", "false").lower() in ("1", "true", "yes"),
        gsm8k_path=gsm8k_path,
        run_max_new_tokens=int(cfg.eval.get("max_new_tokens") or 256),
    )
    result["results_path"] = str(write_results(result, run_dir))
    return result
