"""The Flower ClientApp: strategy-agnostic, driven by the round's task and adapter kind.

Two handlers: `train` (one local round) and `identity` (a query: the node's stable name and
example count, see fedpeft/identity.py). Simulations add their own mods (simulation.py).
"""

from __future__ import annotations

import json

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import adapters, privacy, training
from fedpeft.clients import client_state, drift, local_factors, rank_pruning
from fedpeft.clients.client_data import client_example_count, client_examples
from fedpeft.clients.node_config import node_task
from fedpeft.identity import CLIENT_ID, member
from fedpeft.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    IDENTITY_ACTION,
    METRICS_KEY,
    NUM_EXAMPLES,
    TASK_KEY,
    from_record,
    metrics_record,
    record_bytes,
    to_record,
)
from fedpeft.runtime import adapter_spec, model_runtime

app = ClientApp()


@app.query(IDENTITY_ACTION)
def identity(msg: Message, context: Context) -> Message:
    """Reply with this node's stable name and the number of examples it trains on.

    The query carries the task, which says how to read this node's data; the count is what this
    node's replies may claim (their FedAvg weight) for the rest of the run.
    """
    config = msg.content[CONFIG_KEY]
    task = node_task(json.loads(str(config[TASK_KEY])), context.node_config)
    count = client_example_count(task, context.node_config)
    metrics = MetricRecord({CLIENT_ID: member(context), NUM_EXAMPLES: count})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A deployed node's local round, held to the privacy policy in its own node config."""
    return train_round(msg, context, privacy.NodePolicy.from_node_config(context.node_config))


def train_round(msg: Message, context: Context, policy: privacy.NodePolicy) -> Message:
    """Load the payload over the initial adapter, train the kind's factors, send them back.

    The round's config may also say: train a LoRA of this node's own rank (`adapter-rank`) and
    alpha (`adapter-alpha`, for per-rank scaling), start from a fresh LoRA drawn from a seed
    (`fresh-seed`), and take stacked modules or frozen factors into this node's state (see
    client_state) before training, and with `rank-min` prune its own rank (rank_pruning). The
    task's DP settings are checked against `policy` before anything is trained; a private reply
    carries only data-independent metrics (release.py). The task's `client_opt` adds FedProx's
    proximal term and SCAFFOLD's correction (drift.py).
    """
    config = msg.content[CONFIG_KEY]
    task = node_task(json.loads(str(config[TASK_KEY])), context.node_config)
    server_round = int(config["server-round"])
    dp = privacy.DPSettings.from_task(task)
    store = privacy.LedgerFile(policy.state_dir, context.run_id, member(context))
    policy.check(dp, has_ledger=store.exists())
    if "adapter-rank" in config:
        task["adapter"]["rank"] = int(config["adapter-rank"])
    if "adapter-alpha" in config:
        task["adapter"]["alpha"] = float(config["adapter-alpha"])
    pruning = rank_pruning.RankPruning.start(context.state, config, task)
    spec = adapter_spec(task)
    runtime = model_runtime(task)
    examples, _ = local_factors.split(
        client_examples(task, context.node_config), config, int(task["seed"]), member(context)
    )
    local = local_factors.local_names(config)
    local_store = local_factors.LocalFactorFile(policy.state_dir, context.run_id, member(context))
    payload = msg.content[ARRAYS_KEY]
    received, control = drift.split_control(from_record(payload))
    plain, stacks, frozen = client_state.split_payload(received)
    client_state.receive(context.state, config, stacks, frozen)
    if pruning is not None:
        plain = pruning.receive(plain)
    runtime.reset(plain, client_state.held_stacks(context.state))
    adapters.write_adapter(runtime.model, client_state.held_frozen(context.state))
    if "fresh-seed" in config:
        adapters.write_adapter(
            runtime.model, adapters.fresh_lora(runtime.model, config["fresh-seed"])
        )
    if local:
        adapters.write_adapter(runtime.model, local_factors.held(context.state, local_store))

    hp = task["train"]
    optimizer, steps = training.local_round(runtime.model, hp, len(examples))
    trained = adapters.select_keys(
        adapters.adapter_tensors(runtime.model), spec.trained_factors, spec.train_head
    )
    correction = drift.start_round(runtime.model, trained, task, control, context.state, optimizer)
    penalty = pruning.penalty(runtime.model) if pruning is not None else None
    seed = training.sampler_seed(int(task["seed"]), server_round, member(context))
    if dp.enabled:
        result, dp_metrics = privacy.private_round(
            runtime.model,
            examples,
            optimizer,
            store=store,
            policy=policy,
            settings=dp,
            steps=steps,
            batch_size=int(hp["batch_size"]),
            pad_token_id=runtime.tokenizer.pad_token_id,
            device=runtime.device,
            seed=seed,
            penalty=penalty,
        )
    else:
        result = training.train_steps(
            runtime.model,
            examples,
            optimizer,
            steps=steps,
            batch_size=int(hp["batch_size"]),
            pad_token_id=runtime.tokenizer.pad_token_id,
            device=runtime.device,
            seed=seed,
            max_grad_norm=hp.get("max_grad_norm"),
            penalty=penalty,
        )
    keys = adapters.select_keys(
        adapters.adapter_tensors(runtime.model), spec.trained_factors, spec.train_head
    )
    if local:
        kept = [
            k for k in adapters.adapter_tensors(runtime.model) if local_factors.is_local(k, local)
        ]
        local_factors.keep(
            context.state, local_store, adapters.read_adapter(runtime.model, kept), server_round
        )
        keys = [k for k in keys if not local_factors.is_local(k, local)]
    controls = drift.finish_round(correction, control, context.state)
    tensors = adapters.read_adapter(runtime.model, keys)
    if pruning is not None:
        tensors = pruning.finish(context.state, tensors)
    reply = to_record({**tensors, **controls})
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        "steps": result.steps,
        "bytes-down": record_bytes(payload),
        "bytes-up": record_bytes(reply),
        **client_state.version_metrics(context.state, config),
        **(pruning.metrics() if pruning is not None else {}),
    }
    if dp.enabled:
        metrics = privacy.private_reply_metrics({**metrics, **dp_metrics})
    else:
        metrics["train-loss"] = result.loss
    return Message(
        RecordDict({ARRAYS_KEY: reply, METRICS_KEY: metrics_record(metrics)}), reply_to=msg
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A deployed node's personalised evaluation, held to the privacy policy in its node config."""
    return evaluate_round(msg, context, privacy.NodePolicy.from_node_config(context.node_config))


def evaluate_round(msg: Message, context: Context, policy: privacy.NodePolicy) -> Message:
    """Score this node's personal model (payload + its local factors) on its held-out slice.

    The round's config names the local factors and the held-out share (local_factors.py). A
    private round, a policy that requires DP, or a ledger for the run: the node refuses, since
    the accuracy of its own data is released unaccounted otherwise.
    """
    config = msg.content[CONFIG_KEY]
    task = node_task(json.loads(str(config[TASK_KEY])), context.node_config)
    store = privacy.LedgerFile(policy.state_dir, context.run_id, member(context))
    local_factors.check_release(privacy.DPSettings.from_task(task), policy, store.exists())
    runtime = model_runtime(task)
    _, held_out = local_factors.split(
        client_examples(task, context.node_config), config, int(task["seed"]), member(context)
    )
    if not held_out:
        raise ValueError("this node holds no examples out of training: nothing to evaluate on")
    local_store = local_factors.LocalFactorFile(policy.state_dir, context.run_id, member(context))
    runtime.reset(from_record(msg.content[ARRAYS_KEY]))
    adapters.write_adapter(runtime.model, local_factors.held(context.state, local_store))
    scores = training.evaluate(
        runtime.model,
        held_out,
        batch_size=int(task["train"]["batch_size"]),
        pad_token_id=runtime.tokenizer.pad_token_id,
        device=runtime.device,
        num_labels=int(task["num_labels"]),
    )
    metrics = {
        CLIENT_ID: member(context),
        NUM_EXAMPLES: len(held_out),
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
    }
    return Message(RecordDict({METRICS_KEY: metrics_record(metrics)}), reply_to=msg)
