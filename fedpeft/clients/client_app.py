"""The Flower ClientApp: strategy-agnostic, driven by the round's task and adapter kind.

Two handlers: `train` (one local round) and `identity` (a query: the node's stable name and
example count, see fedpeft/identity.py). Simulations add their own mods (simulation.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import adapters, privacy, training
from fedpeft.clients import local_factors, task_guard
from fedpeft.clients.client_data import client_example_count, client_examples, data_fingerprint
from fedpeft.clients.client_state import ClientState, StateMismatch
from fedpeft.clients.drift import Drift
from fedpeft.clients.fresh_start import FreshStart
from fedpeft.clients.local_factors import LocalFactors
from fedpeft.clients.node_config import node_task
from fedpeft.clients.rank_pruning import RankPruning
from fedpeft.clients.round_feature import Round, RoundFeature, total_penalty
from fedpeft.clients.secure_sum_mods import secure_sum_mod
from fedpeft.identity import member
from fedpeft.protocol import (
    ADAPTER_ALPHA,
    ADAPTER_RANK,
    ARRAYS_KEY,
    BYTES_DOWN,
    BYTES_UP,
    CLIENT_ID,
    CLIENT_SECONDS,
    CONFIG_KEY,
    IDENTITY_ACTION,
    METRICS_KEY,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SERVER_ROUND,
    TASK_KEY,
    TRAIN_LOSS,
)
from fedpeft.records import from_record, metrics_record, record_bytes, to_record
from fedpeft.round_task import RoundTask
from fedpeft.runtime import model_runtime

logger = logging.getLogger(__name__)
#: errors whose text depends only on the task, the node's config and its ledger, never on its data
#: (the example count the node declares anyway aside): a deployed node sends them whole
DATA_INDEPENDENT = (
    task_guard.TaskRefused,
    privacy.PolicyViolation,
    privacy.BudgetExhausted,
    privacy.PrivateRoundFailed,
    privacy.LedgerCorrupt,
    StateMismatch,
)


class NodeFailed(RuntimeError):
    """A deployed node's round failed; the reason stays in the node's log."""


def generic_errors(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
    """Flower mod of a deployed node: any other error reaches the server as its type only.

    Flower sends `str(exception)` to the server, and a data error's text can quote the node's
    labels, columns, row counts or rows. The node's log keeps the whole text.
    """
    try:
        return call_next(msg, context)
    except DATA_INDEPENDENT:
        raise
    except Exception as exc:
        logger.exception("this node's %s handler failed", msg.metadata.message_type)
        raise NodeFailed(
            f"the node could not run the {msg.metadata.message_type} message "
            f"({type(exc).__name__}); its reason stays in the node's log, since it could "
            "describe the node's data"
        ) from None


app = ClientApp(mods=[generic_errors])

#: the optional behaviours of a train round, in the order their hooks run (round_feature.py)
FEATURES: tuple[type[RoundFeature], ...] = (
    Drift,
    ClientState,
    RankPruning,
    FreshStart,
    LocalFactors,
)


def read_task(msg: Message, context: Context, policy: privacy.NodePolicy) -> RoundTask:
    """The message's task, parsed, checked and typed by this node (task_guard, round_task).

    A deployed node (policy.deployed) also refuses task paths it did not allow and trains its
    own `model-path`; the node's `device` and `dtype` replace the server's.
    """
    config = msg.content[CONFIG_KEY]
    task = task_guard.parse_task(str(config[TASK_KEY]))
    task_guard.check_task(task, context.node_config, deployed=policy.deployed)
    task_guard.check_round(config, context.node_config)
    if policy.deployed:
        task = task_guard.pin_model(task, context.node_config)
    return task_guard.round_task(node_task(task, context.node_config))


@app.query(IDENTITY_ACTION)
def identity(msg: Message, context: Context) -> Message:
    """A deployed node's identity reply (identity_reply), under the policy in its node config."""
    return identity_reply(msg, context, privacy.NodePolicy.from_node_config(context.node_config))


def identity_reply(msg: Message, context: Context, policy: privacy.NodePolicy) -> Message:
    """Reply with this node's stable name and the number of examples it trains on.

    The query carries the task, which says how to read this node's data; the count is what this
    node's replies may claim (their FedAvg weight) for the rest of the run.
    """
    task = read_task(msg, context, policy)
    count = client_example_count(task.to_dict(), context.node_config)
    metrics = MetricRecord({CLIENT_ID: member(context), NUM_EXAMPLES: count})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.train(mods=[secure_sum_mod])
def train(msg: Message, context: Context) -> Message:
    """A deployed node's local round, held to the privacy policy in its own node config.

    Under secure aggregation (`secagg.enabled`) `secure_sum_mod` runs SecAgg+ around it
    (secure_sum_mods.py); `generic_errors`, the app's own mod, stays outside both.
    """
    return train_round(msg, context, privacy.NodePolicy.from_node_config(context.node_config))


def train_round(msg: Message, context: Context, policy: privacy.NodePolicy) -> Message:
    """Train the global adapter on this node's data and reply with what the method collects.

    The core of the round is here: check the task and the node's policy, build the model at the
    node's adapter, load the payload, train (DP-SGD when the task says so), read the reply.
    Everything optional (client state, rank pruning, drift, fresh starts, local factors) is a
    round feature (round_feature.py) that joins in at fixed hooks, in FEATURES order. The task's
    DP settings are checked against `policy` before anything is trained; a private reply carries
    only data-independent metrics (release.py).
    """
    config = msg.content[CONFIG_KEY]
    task = read_task(msg, context, policy)
    dp, hp = task.dp, task.train
    server_round = int(config[SERVER_ROUND])
    store = privacy.LedgerFile(
        policy.state_dir, context.run_id, data_fingerprint(task.to_dict(), context.node_config)
    )
    policy.check(dp, has_ledger=store.exists())
    task = task.with_adapter(  # a node of its own rank (HetLoRA, FLoRA)
        config.get(ADAPTER_RANK, task.adapter.rank), config.get(ADAPTER_ALPHA, task.adapter.alpha)
    )
    round_ = Round(task, config, context, policy, server_round, member(context))
    features = [f for f in (feature.for_round(round_) for feature in FEATURES) if f is not None]
    spec = task.adapter
    for feature in features:
        spec = feature.adapter(spec)
    task = task.with_adapter(spec.rank, spec.alpha)
    plain = task.to_dict()  # the model and data sections: runtime.py and client_data.py read them
    runtime = model_runtime(plain)
    examples = client_examples(plain, context.node_config)
    payload = msg.content[ARRAYS_KEY]
    received = from_record(payload)
    stacks: list[dict[str, torch.Tensor]] = []
    for feature in features:
        examples = feature.examples(examples)
        received = feature.receive(received)
        stacks += feature.stacks()
    runtime.reset(received, stacks)
    for feature in features:
        feature.load(runtime.model)

    optimizer, steps = training.local_round(runtime.model, hp, len(examples))
    trained = adapters.select_keys(
        adapters.adapter_tensors(runtime.model), spec.trained_factors, spec.train_head
    )
    for feature in features:
        feature.before_training(runtime.model, optimizer, trained)
    penalty = total_penalty(features, runtime.model)
    seed = training.sampler_seed(task.seed, server_round, member(context))
    cpu_started = time.process_time()
    if dp.enabled:
        result, dp_metrics = privacy.private_round(
            runtime.model,
            examples,
            optimizer,
            store=store,
            policy=policy,
            settings=dp,
            steps=steps,
            batch_size=hp.batch_size,
            pad_token_id=runtime.tokenizer.pad_token_id,
            device=runtime.device,
            seed=seed,
            penalty=penalty,
            canaries=_gradient_canaries(task, context, runtime.model, trained),
        )
    else:
        result = training.train_steps(
            runtime.model,
            examples,
            optimizer,
            steps=steps,
            batch_size=hp.batch_size,
            pad_token_id=runtime.tokenizer.pad_token_id,
            device=runtime.device,
            seed=seed,
            max_grad_norm=hp.max_grad_norm,
            penalty=penalty,
        )
    cpu_seconds = time.process_time() - cpu_started
    keys = list(trained)
    for feature in features:
        keys = feature.reply_keys(runtime.model, keys)
    tensors = adapters.read_adapter(runtime.model, keys)
    for feature in reversed(features):
        tensors = feature.finish(tensors)
    reply = to_record(tensors)
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        "steps": result.steps,
        BYTES_DOWN: record_bytes(payload),
        BYTES_UP: record_bytes(reply),
    }
    for feature in features:
        metrics.update(feature.metrics())
    if dp.enabled:
        metrics = privacy.private_reply_metrics({**metrics, **dp_metrics})
    else:  # CPU time follows the examples' lengths (dynamic padding): not released under DP
        metrics[TRAIN_LOSS] = result.loss
        metrics[CLIENT_SECONDS] = cpu_seconds
    return Message(
        RecordDict({ARRAYS_KEY: reply, METRICS_KEY: metrics_record(metrics)}), reply_to=msg
    )


def _gradient_canaries(
    task: RoundTask, context: Context, model: torch.nn.Module, trained: list[str]
) -> privacy.HeldCanaries | None:
    """A simulated audit's gradient canaries this client holds, on its trained tensors."""
    if task.canaries is None or task.canaries.kind != "gradient":
        return None
    live = adapters.adapter_tensors(model)
    return privacy.HeldCanaries.place(
        task.canaries,
        [live[k] for k in privacy.canary_keys(live, trained)],
        int(context.node_config[PARTITION_ID]),
        int(context.node_config[NUM_PARTITIONS]),
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
    task = read_task(msg, context, policy)
    plain = task.to_dict()
    store = privacy.LedgerFile(
        policy.state_dir, context.run_id, data_fingerprint(plain, context.node_config)
    )
    local_factors.check_release(task.dp, policy, store.exists())
    runtime = model_runtime(plain)
    _, held_out = local_factors.split(
        client_examples(plain, context.node_config), config, task.seed, member(context)
    )
    if not held_out:
        raise ValueError("this node holds no examples out of training: nothing to evaluate on")
    local_store = local_factors.LocalFactorFile(policy.state_dir, context.run_id, member(context))
    runtime.reset(from_record(msg.content[ARRAYS_KEY]))
    adapters.write_adapter(runtime.model, local_factors.held(context.state, local_store))
    scores = training.evaluate(
        runtime.model,
        held_out,
        batch_size=task.train.batch_size,
        pad_token_id=runtime.tokenizer.pad_token_id,
        device=runtime.device,
        num_labels=task.num_labels,
    )
    metrics = {
        CLIENT_ID: member(context),
        NUM_EXAMPLES: len(held_out),
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
    }
    return Message(RecordDict({METRICS_KEY: metrics_record(metrics)}), reply_to=msg)
