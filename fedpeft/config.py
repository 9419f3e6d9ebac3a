"""Hydra configs: compose the run's config from overrides and validate every value up front."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpeft.client_pool import federation_pool_size
from fedpeft.data.partition import partition_params
from fedpeft.errors import ConfigError
from fedpeft.models import ModelSpec, check_compute_dtype, resolve_device
from fedpeft.privacy.client_level import ClientDPSettings, ClientNoise
from fedpeft.privacy.settings import validate_dp
from fedpeft.stop_rule import StopAt
from fedpeft.tracking import TrackingSettings
from fedpeft.training import PRECISIONS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("strategy", "model", "dataset", "dp", "partition", "federation")


def group_options(group: str) -> list[str]:
    """The option names of a config group (its YAML files)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


#: keys the strategy group no longer has -> the run's key that now holds the value
MOVED_STRATEGY_KEYS = {
    "lr": "train.lr",
    "alpha": "adapter.alpha",
    "train_head": "adapter.train_head",
}


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The run's config from Hydra overrides; an unknown option names the allowed choices."""
    for override in overrides:
        match = re.fullmatch(r"\+?(\w+)=(.*)", override.strip())
        if match and match.group(1) in GROUPS:
            group, value = match.groups()
            if value.strip("'\"") not in group_options(group):
                raise ConfigError(
                    f"{group}={value} is unknown: choose one of {', '.join(group_options(group))}"
                )
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0]
        param = re.search(r"override 'strategy\.params\.(\w+)'", first)
        if param:
            chosen = [o.split("=", 1)[1] for o in overrides if re.match(r"\+?strategy=", o)]
            name = chosen[-1].strip("'\"") if chosen else _default_strategy()
            raise ConfigError(unknown_param_message(name, param.group(1))) from exc
        moved = re.search(r"override 'strategy\.(lr|alpha|train_head)'", first)
        if moved:
            key = MOVED_STRATEGY_KEYS[moved.group(1)]
            raise ConfigError(
                f"strategy.{moved.group(1)} is gone: a method's own default lives in its config "
                f"and the run's value is {key}; set {key}=..."
            ) from exc
        raise ConfigError(
            f"bad override ({first}): use key=value, e.g. federation.rounds=5"
        ) from exc
    validate(cfg)
    return cfg


def _default_strategy() -> str:
    """The strategy the root config picks when no `strategy=` override is given."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return str(compose(config_name="config").strategy.name)


def strategy_options(name: str) -> set[str]:
    """What strategy.params may set for a method (its class says: `options()`)."""
    from fedpeft.strategies import STRATEGIES

    return STRATEGIES[name].options()


def unknown_param_message(name: str, key: str) -> str:
    """The error for a strategy.params key the method has no option for."""
    from fedpeft.strategies import STRATEGIES

    if key == "ranks":
        takers = sorted(n for n in STRATEGIES if "ranks" in strategy_options(n))
        return (
            f"strategy.params.ranks: {name} cannot train clients at different ranks (its clients "
            f"share factors of adapter.rank): use strategy={', '.join(takers[:-1])} or "
            f"{takers[-1]}, or drop strategy.params.ranks"
        )
    known = ", ".join(sorted(strategy_options(name))) or "none"
    return f"strategy.params.{key} is not an option of {name} (its options: {known})"


def _validate_strategy_params(cfg: DictConfig) -> None:
    """The method's own options: known keys, then the method's own checks (`check_params`)."""
    from fedpeft.strategies import STRATEGIES

    name, raw = cfg.strategy.name, cfg.strategy.get("params")
    params = {} if raw is None else OmegaConf.to_container(raw, resolve=True)
    assert isinstance(params, dict)
    unknown = sorted(set(params) - strategy_options(name))
    if unknown:
        raise ConfigError(unknown_param_message(name, unknown[0]))
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert isinstance(strategy, dict)
    try:
        STRATEGIES[name].check_params(params, strategy, int(cfg.adapter.rank))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Check every value the run depends on; the first problem raises a ConfigError."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{key} must be set, e.g. {key}=<value>") from exc
    fed, train, adapter = cfg.federation, cfg.train, cfg.adapter
    for key in ("num_clients", "rounds", "min_clients"):
        value = fed[key]
        _require(
            isinstance(value, int) and value >= 1,
            f"federation.{key}={value} must be an integer >= 1",
        )
    _require(
        _is_number(fed.fraction) and 0 < fed.fraction <= 1,
        f"federation.fraction={fed.fraction} must be in (0, 1], e.g. 0.5",
    )
    _require(
        fed.min_clients <= fed.num_clients,
        f"federation.min_clients={fed.min_clients} exceeds "
        f"federation.num_clients={fed.num_clients}",
    )
    if fed.local_epochs is None:
        _require(
            isinstance(fed.local_steps, int) and fed.local_steps >= 1,
            f"federation.local_steps={fed.local_steps} must be an integer >= 1",
        )
    else:
        _require(
            _is_number(fed.local_epochs) and fed.local_epochs > 0,
            f"federation.local_epochs={fed.local_epochs} must be positive "
            "(or null to use local_steps)",
        )
    _require(
        _is_number(fed.client_cpus) and fed.client_cpus > 0, "federation.client_cpus must be > 0"
    )
    _require(
        _is_number(fed.client_gpus) and fed.client_gpus >= 0, "federation.client_gpus must be >= 0"
    )
    _require(
        isinstance(adapter.rank, int) and adapter.rank >= 1,
        f"adapter.rank={adapter.rank} must be a positive integer, e.g. 8",
    )
    _require(
        _is_number(adapter.alpha) and adapter.alpha > 0,
        f"adapter.alpha={adapter.alpha} must be positive, e.g. 16",
    )
    _require(
        isinstance(train.batch_size, int) and train.batch_size >= 1,
        f"train.batch_size={train.batch_size} must be an integer >= 1",
    )
    lrs = {"train.lr": train.lr, "train.head_lr": train.head_lr}
    for key, value in lrs.items():
        if value is not None:
            _require(_is_number(value) and value > 0, f"{key}={value} must be positive, e.g. 1e-3")
    _require(
        train.optimizer in ("adamw", "sgd"),
        f"train.optimizer={train.optimizer} must be adamw or sgd",
    )
    _require(
        isinstance(train.max_length, int) and train.max_length >= 8,
        f"train.max_length={train.max_length} must be an integer >= 8",
    )
    _require(
        isinstance(cfg.eval.batch_size, int) and cfg.eval.batch_size >= 1,
        f"eval.batch_size={cfg.eval.batch_size} must be an integer >= 1",
    )
    every = cfg.eval.every
    _require(
        isinstance(every, int) and not isinstance(every, bool) and every >= 1,
        f"eval.every={every} must be an integer >= 1 (1: evaluate after every round)",
    )
    if cfg.partition.name == "dirichlet":
        alpha = cfg.partition.alpha
        _require(
            _is_number(alpha) and alpha > 0, f"partition.alpha={alpha} must be positive, e.g. 0.5"
        )
        floor = cfg.partition.get("min_partition_size", "auto")
        _require(
            floor == "auto"
            or (isinstance(floor, int) and not isinstance(floor, bool) and floor >= 0),
            f"partition.min_partition_size={floor} must be an integer >= 0 or auto "
            "(the examples every client gets before the Dirichlet draw)",
        )
    _require(isinstance(cfg.seed, int), f"seed={cfg.seed} must be an integer")
    partition_params(cfg.partition)
    _validate_task(cfg)
    _validate_scale(cfg)
    _validate_robustness(cfg)
    _validate_strategy_params(cfg)
    _validate_drift(cfg)
    client_dp = _validate_client_dp(cfg)
    _validate_secagg(cfg, client_dp)
    _validate_pool(cfg, client_dp)
    StopAt.from_config(cfg)
    TrackingSettings.from_config(cfg)


def _validate_drift(cfg: DictConfig) -> None:
    """client_opt and server_opt: their values, the optimiser SCAFFOLD needs, and the method."""
    from fedpeft.strategies import STRATEGIES
    from fedpeft.strategies.server_opt import check_settings

    client, server = cfg.get("client_opt") or {}, cfg.get("server_opt") or {}
    mu = client.get("proximal_mu", 0.0)
    _require(
        _is_number(mu) and mu >= 0,
        f"client_opt.proximal_mu={mu} must be a number >= 0 (0: no proximal term), e.g. 0.01",
    )
    scaffold = client.get("scaffold", False)
    _require(isinstance(scaffold, bool), f"client_opt.scaffold={scaffold} must be true or false")
    name = server.get("name", "none")
    betas = server.get("betas", [0.9, 0.99])
    values = (server.get("lr"), server.get("tau", 1e-3), server.get("momentum", 0.9))
    _require(
        all(v is None or _is_number(v) for v in values)
        and isinstance(betas, Sequence | ListConfig)
        and all(_is_number(b) for b in betas),
        f"server_opt.lr, tau, momentum and betas must be numbers (got {values}, betas {betas})",
    )
    try:
        check_settings(str(name), values[0], list(betas), values[1], values[2])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if scaffold:
        _require(
            cfg.train.optimizer == "sgd" and not cfg.train.momentum,
            f"client_opt.scaffold=true with train.optimizer={cfg.train.optimizer} and "
            f"train.momentum={cfg.train.momentum}: option II's control variate "
            "(theta_0 - theta_K) / (K lr) is the mean gradient only under plain SGD; set "
            "train.optimizer=sgd train.momentum=0 (and a matching train.lr)",
        )
    raw = cfg.strategy.get("params")
    params = {} if raw is None else OmegaConf.to_container(raw, resolve=True)
    klass = STRATEGIES[cfg.strategy.name]
    for option, field, on in (
        ("server_opt", f"server_opt.name={name}", name != "none"),
        ("scaffold", "client_opt.scaffold=true", scaffold),
    ):
        reason = klass.drift_refusal(option, params) if on else None
        off = "server_opt.name=none" if option == "server_opt" else "client_opt.scaffold=false"
        _require(
            reason is None,
            f"{field} with strategy={cfg.strategy.name}: {reason}; set {off}, or use a method "
            f"that composes with it ({', '.join(_composing(option))})",
        )


def _validate_client_dp(cfg: DictConfig) -> ClientDPSettings:
    """The `client_dp` group, checked, and the method's own word on composing with it."""
    from fedpeft.strategies import STRATEGIES

    raw = cfg.get("client_dp")
    plain = {} if raw is None else OmegaConf.to_container(raw, resolve=True)
    settings = ClientDPSettings.parse(plain, "client_dp")
    if not settings.enabled:
        return settings
    params_raw = cfg.strategy.get("params")
    params = {} if params_raw is None else OmegaConf.to_container(params_raw, resolve=True)
    reason = STRATEGIES[cfg.strategy.name].client_dp_refusal(params)
    composing = sorted(n for n, k in STRATEGIES.items() if k.client_dp_refusal({}) is None)
    _require(
        reason is None,
        f"client_dp.enabled=true with strategy={cfg.strategy.name}: {reason}; use a method "
        f"whose aggregate is a sum of the clients' tensors ({', '.join(composing)})",
    )
    _require(
        not bool((cfg.get("client_opt") or {}).get("scaffold", False)),
        "client_dp.enabled=true with client_opt.scaffold=true: each client's control variate "
        "would reach the server outside the clipped and noised sum; set client_opt.scaffold=false",
    )
    ClientNoise.calibrate(
        settings,
        population=cfg.federation.num_clients,
        sample_rate=float(cfg.federation.fraction),
        rounds=cfg.federation.rounds,
    )
    return settings


def _validate_secagg(cfg: DictConfig, dp: ClientDPSettings) -> None:
    """The `secagg` group: SecAgg+'s settings, and what secure aggregation composes with.

    `dp` is the run's client-level DP (already checked), whose sum secure aggregation carries.
    """
    from fedpeft.secure_sum import secagg_settings
    from fedpeft.strategies import STRATEGIES

    settings = secagg_settings(cfg)
    if not settings.enabled:
        return
    _require(
        dp.enabled,
        "secagg.enabled=true needs client_dp.enabled=true (e.g. client_dp=eps3): secure "
        "aggregation here sums client-level DP's clipped updates, and SecAgg+ on its own (a "
        "plain weighted mean) is not supported; set client_dp=eps3 or secagg.enabled=false",
    )
    name = cfg.strategy.name
    klass = STRATEGIES[name]
    usable = sorted(n for n, k in STRATEGIES.items() if k.sums_replies and k.version_metric is None)
    _require(
        klass.version_metric is None,
        f"secagg.enabled=true with strategy={name}: its clients report the version of the state "
        "they hold in their reply's metrics, which secure aggregation does not release; use "
        f"one of {', '.join(usable)}, or set secagg.enabled=false",
    )
    fed = cfg.federation
    _require(
        fed.num_clients >= 2,
        f"secagg.enabled=true with federation.num_clients={fed.num_clients}: SecAgg+ needs at "
        "least 2 nodes per round; use federation.num_clients >= 2",
    )
    _require(
        fed.num_clients <= settings.max_cohort(),
        f"secagg.enabled=true with federation.num_clients={fed.num_clients}: a cohort of more "
        f"than {settings.max_cohort()} nodes can wrap the quantised sum modulo "
        f"secagg.modulus_range={settings.modulus_range}; lower secagg.quantization_range "
        f"(now {settings.quantization_range})",
    )


def _validate_pool(cfg: DictConfig, dp: ClientDPSettings) -> None:
    """`federation.pool_size`, and what a pooled simulation (fewer nodes than clients) refuses."""
    fed = cfg.federation
    size = federation_pool_size(fed, dp.enabled)
    if size < fed.num_clients:
        _require(
            not cfg.secagg.enabled,
            f"secagg.enabled=true with a pool of {size} nodes for {fed.num_clients} clients: "
            "SecAgg+ keeps each node's keys on the node across its stages, which a node serving "
            f"several clients would mix; set federation.pool_size={fed.num_clients} (one node per "
            "client) or secagg.enabled=false",
        )


def _composing(option: str) -> list[str]:
    """The methods whose default params compose with a drift option (README's table)."""
    from fedpeft.strategies import STRATEGIES

    return [n for n, k in sorted(STRATEGIES.items()) if k.drift_refusal(option, {}) is None]


def _validate_task(cfg: DictConfig) -> None:
    """The task, its model and data agree; causal-LM data has no labels to partition by."""
    task, dataset_task = cfg.task, cfg.dataset.get("task") or "classification"
    _require(
        task in ("classification", "causal_lm"),
        f"task={task} is unknown: choose classification or causal_lm",
    )
    _require(
        task == dataset_task,
        f"task={task} but dataset={cfg.dataset.name} is {dataset_task} data: pick a "
        + (
            "prompt/response dataset (dataset=gsm8k or jsonl)"
            if task == "causal_lm"
            else "text/label dataset"
        )
        + " or drop task=",
    )
    ModelSpec.from_config(cfg.model, 0, task)
    _require(
        cfg.model.get("task") in (None, task),
        f"model.task={cfg.model.get('task')} does not match task={task}: use model=hf for "
        "classifiers and model=hf_causal for causal LMs",
    )
    if task == "causal_lm":
        _require(
            cfg.partition.name in ("iid", "sampled"),
            f"partition={cfg.partition.name} splits by label, and {cfg.dataset.name} has none: "
            "use partition=iid (or partition=sampled)",
        )
        tokens = cfg.eval.get("max_new_tokens")
        _require(
            isinstance(tokens, int) and tokens >= 1,
            f"eval.max_new_tokens={tokens} must be an integer >= 1, e.g. 256",
        )


def _validate_scale(cfg: DictConfig) -> None:
    """Quantised bases, mixed precision and checkpointing: each with the methods and DP it suits."""
    train, model = cfg.train, cfg.model
    precision = train.get("precision") or "fp32"
    _require(
        precision in PRECISIONS,
        f"train.precision={precision} is unknown: choose one of {', '.join(PRECISIONS)}",
    )
    checkpointing = train.get("gradient_checkpointing") or False
    _require(
        isinstance(checkpointing, bool),
        f"train.gradient_checkpointing={checkpointing} must be true or false",
    )
    device = resolve_device(cfg.device)
    names = {"bf16": "bfloat16", "fp16": "float16"}
    if precision in names:
        check_compute_dtype(names[precision], device, "train.precision")
    quantization = model.get("quantization") or "none"
    if quantization != "none":
        check_compute_dtype(model.get("compute_dtype") or "float32", device, "model.compute_dtype")
        _refuse_on_quantised(cfg, quantization)
    if cfg.dp.get("enabled"):
        _require(
            not checkpointing,
            "dp with train.gradient_checkpointing=true: Opacus' per-sample hooks see each layer "
            "twice when its activations are recomputed (hooks mode fails, ghost clipping takes it "
            "for parameter tying), so set train.gradient_checkpointing=false (or dp=off)",
        )
        _require(
            precision == "fp32",
            f"dp with train.precision={precision}: under autocast Opacus computes per-sample "
            f"gradients and their norms in {names.get(precision)}, so clipping to "
            "dp.max_grad_norm holds only up to rounding: use train.precision=fp32 with dp "
            "(a 4bit base is fine)",
        )
        _require(
            not model.get("device_map"),
            "dp with model.device_map: Opacus clips each example's gradient over all trainable "
            "tensors at once, which must sit on one device, and a sharded base spreads the LoRA "
            "factors over several: drop model.device_map (model.quantization=4bit fits larger "
            "bases on one GPU) or use dp=off",
        )


def _refuse_on_quantised(cfg: DictConfig, quantization: str) -> None:
    """The method's own word on a quantised base (`base_refusal`); name those that train on one."""
    from fedpeft.strategies import STRATEGIES

    raw = cfg.strategy.get("params")
    params = {} if raw is None else OmegaConf.to_container(raw, resolve=True)
    reason = STRATEGIES[cfg.strategy.name].base_refusal(quantization, params)
    others = sorted(n for n, k in STRATEGIES.items() if k.base_refusal(quantization, {}) is None)
    _require(
        reason is None,
        f"strategy={cfg.strategy.name} on a {quantization} base: {reason}; use "
        f"model.quantization=none with it, or another strategy ({', '.join(others)})",
    )


def _validate_robustness(cfg: DictConfig) -> None:
    """Round timeout, reply checks, fault injection and resume."""
    timeout = cfg.federation.round_timeout
    _require(
        _is_number(timeout) and timeout > 0,
        f"federation.round_timeout={timeout} must be a positive number of seconds, e.g. 600",
    )
    bound, most = cfg.replies.norm_bound, cfg.replies.max_num_examples
    _require(
        bound is None or (_is_number(bound) and bound > 0),
        f"replies.norm_bound={bound} must be positive (or null for no bound), e.g. 100",
    )
    _require(
        most is None or (isinstance(most, int) and most >= 1),
        f"replies.max_num_examples={most} must be an integer >= 1 (or null)",
    )
    multiple = cfg.replies.max_median_multiple
    _require(
        _is_number(multiple) and multiple >= 1,
        f"replies.max_median_multiple={multiple} must be a number >= 1 (the median client's "
        "own count must pass), e.g. 10",
    )
    faults = cfg.faults
    for key in ("crash_prob", "slow_prob"):
        value = faults[key]
        _require(
            _is_number(value) and 0 <= value <= 1,
            f"faults.{key}={value} must be a probability in [0, 1], e.g. 0.3",
        )
    _require(
        faults.crash_prob + faults.slow_prob <= 1,
        f"faults.crash_prob + faults.slow_prob = {faults.crash_prob + faults.slow_prob} "
        "exceeds 1: lower one of them",
    )
    _require(
        faults.slow_s is None or (_is_number(faults.slow_s) and faults.slow_s >= 0),
        f"faults.slow_s={faults.slow_s} must be >= 0 seconds (or null: round_timeout + 1)",
    )
    _require(isinstance(faults.seed, int), f"faults.seed={faults.seed} must be an integer")
    _require(
        cfg.resume is None or (isinstance(cfg.resume, str) and Path(cfg.resume).is_dir()),
        f"resume={cfg.resume} is not a run folder: pass resume=<run_dir> of an earlier run",
    )
    if cfg.resume is not None:
        from fedpeft.strategies import STRATEGIES

        reason = STRATEGIES[cfg.strategy.name].resume_refusal()
        _require(reason is None, f"resume= with strategy={cfg.strategy.name}: {reason}")
    scaffold = bool((cfg.get("client_opt") or {}).get("scaffold", False))
    _require(
        cfg.resume is None or not scaffold,
        "resume= with client_opt.scaffold=true: the server's control variate c is in the "
        "checkpoint, but each client's c_k lives in its Flower run's node state and a resumed "
        "run starts them at zero, so c would no longer be their average; rerun from the start "
        "without resume=, or resume with client_opt.scaffold=false",
    )
    validate_dp(cfg)
