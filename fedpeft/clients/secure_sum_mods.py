"""Client mods of secure aggregation: SecAgg+ around fedpeft's Message-API train handler.

Flower's `secaggplus_mod` speaks the legacy records (`fitins.*` in, `fitres.*` out) and raises on
a train message without its own `secaggplus_configs` record. `secure_sum_mod`, the outermost mod
of a train handler, hands only SecAgg+ messages to it, with `fitins_adapter` inside it: the
adapter turns the legacy FitIns back into fedpeft's `arrays`/`config` message, runs the handler,
and replies with the node's clipped update, never its metrics. The server (fedpeft/secure_sum.py)
sees only the sum of the masked vectors.

What the server sends in the FitIns config, beside the round's own config entries:
`SECAGG_NAMES`, the names of the FitIns tensors in order (legacy Parameters carry none);
`SECAGG_UPDATE_KEYS`, the tensors whose update u = trained - received the node sums, in order;
`SECAGG_CLIP_NORM`, the bound C the update is clipped to (its L2 norm, all tensors together);
`SECAGG_COUNT`, whether the node appends C x 1[||u|| <= C] (adaptive clipping's count, summed
securely too). A tensor the node does not load but must subtract comes as `BASE_PREFIX` + name.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedpeft.privacy.policy import (
    SECAGG_MIN_THRESHOLD,
    SECAGG_REQUIRED,
    PolicyViolation,
    secagg_min_threshold,
    secagg_required,
)
from fedpeft.protocol import ARRAYS_KEY, CONFIG_KEY
from fedpeft.schema import finite_number

#: the FitIns config entries the server adds under secure aggregation (module docstring)
SECAGG_NAMES = "secagg-names"
SECAGG_UPDATE_KEYS = "secagg-update-keys"
SECAGG_CLIP_NORM = "secagg-clip-norm"
SECAGG_COUNT = "secagg-count"
#: prefix of a tensor sent only as the start of an update (not loaded by the node)
BASE_PREFIX = "secagg-base."

Handler = Callable[[Message, Context], Message]


def secure_sum_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower mod: SecAgg+ (with `fitins_adapter`) for its own messages, plain rounds untouched.

    A node whose config says `secagg-required=true` refuses a plain train message before anything
    is trained, so the server cannot ask for its update in the clear. Each SecAgg+ stage is
    checked against the node's own floor first (`check_secagg_stage`); the server still picks
    the neighbours' keys, so it must be honest-but-curious (docs/privacy.md, SecAgg+ limits).
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if secagg_required(context.node_config):
            raise PolicyViolation(
                f"node policy {SECAGG_REQUIRED}=true refuses a train message outside secure "
                "aggregation: this node sends its update only masked by SecAgg+; start the run "
                "with client_dp enabled and secagg.enabled=true"
            )
        return call_next(msg, context)

    check_secagg_stage(msg, context)

    def adapted(inner: Message, ctx: Context) -> Message:
        return fitins_adapter(inner, ctx, call_next)

    return secaggplus_mod(msg, context, adapted)


def check_secagg_stage(msg: Message, context: Context) -> None:
    """Refuse a SecAgg+ stage that would expose this node more than its policy allows.

    Setup: the reconstruction threshold t must be at least `secagg-min-threshold` (a server that
    colludes with t - 1 nodes can rebuild this node's keys) and at most the shares. Unmask: no
    node may be named both active and dropped (that request asks for both its mask seed's share
    and its key's share, which together unmask that node's own update), and this node, which is
    answering, is not dropped. Flower's mod checks the records' types, not these.
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        floor = secagg_min_threshold(context.node_config)
        threshold, shares = configs.get(Key.THRESHOLD), configs.get(Key.SHARE_NUMBER)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (threshold, shares)):
            raise ValueError(
                f"secure aggregation: threshold {threshold!r} and shares {shares!r} must be "
                "integers"
            )
        if threshold < floor:
            raise PolicyViolation(
                f"node policy {SECAGG_MIN_THRESHOLD}={floor} refuses a SecAgg+ round whose "
                f"reconstruction threshold is {threshold}: the server plus {threshold - 1} "
                "colluding nodes could unmask this node's update; raise "
                "secagg.reconstruction_threshold (and secagg.num_shares) on the server"
            )
        if threshold > shares:
            raise ValueError(
                f"secure aggregation: threshold {threshold} is more than the {shares} shares"
            )
    elif stage == Stage.UNMASK:
        active = set(configs.get(Key.ACTIVE_NODE_ID_LIST, []))
        dropped = set(configs.get(Key.DEAD_NODE_ID_LIST, []))
        both = sorted(active & dropped)
        if both:
            raise PolicyViolation(
                f"secure aggregation: node(s) {both} named both active and dropped; answering "
                "would hand the server both shares that unmask their update"
            )
        if msg.metadata.dst_node_id in dropped:
            raise PolicyViolation(
                f"secure aggregation: this node ({msg.metadata.dst_node_id}) is named as dropped "
                "while it answers; answering would hand the server its key's share"
            )


def is_key_stage(msg: Message) -> bool:
    """A SecAgg+ message of a stage that trains nothing: setup, share_keys or unmask."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and configs is not None
        and configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS
    )


#: The ClientApp a deployed node answers SecAgg+'s key stages with (node/runner.py): the same
#: `secure_sum_mod`, and a train handler that those stages never reach, so each of the three
#: key messages of a round starts without the training stack (torch, transformers, opacus: about
#: 8 s of imports per message on a small CPU). Their errors are protocol errors (a threshold, a
#: node list), never the node's data, so they need no `generic_errors`.
key_stage_app = ClientApp()


@key_stage_app.train(mods=[secure_sum_mod])
def _key_stages_never_train(msg: Message, context: Context) -> Message:
    raise PolicyViolation("a SecAgg+ key stage reached the train handler: refused, nothing trained")


def fitins_adapter(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower mod: FitIns -> fedpeft's train message; its reply -> a FitRes of the clipped update.

    The FitRes holds the update's tensors in `SECAGG_UPDATE_KEYS` order (plus the count entry),
    weight 1 (SecAgg+ then returns the plain mean, which the server multiplies back to the sum)
    and no metrics: a train loss or a CPU time would reach the server in the clear.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names, keys, clip_norm, count = secagg_instructions(config)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ValueError(
            f"secure aggregation: {len(arrays)} tensors arrived under {len(names)} names"
        )
    tensors = dict(zip(names, arrays, strict=True))
    payload = {k: v for k, v in tensors.items() if not k.startswith(BASE_PREFIX)}
    base = {k: payload[k] for k in keys if k in payload}
    base.update({k[len(BASE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(BASE_PREFIX)})
    msg.content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in payload.items()}
            ),
            CONFIG_KEY: ConfigRecord(config),
        }
    )
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = {k: v.numpy() for k, v in reply.content[ARRAYS_KEY].items()}
    update = clipped_update(trained, base, keys, clip_norm, count)
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), 1, {})
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=False)
    return reply


def secagg_instructions(config: dict) -> tuple[list[str], list[str], float, bool]:
    """Pop and check what the server added to the FitIns config; refuse anything malformed.

    Names and update keys must be JSON lists of distinct strings (the keys among the names or
    their `BASE_PREFIX` forms), the bound a finite positive number, the count flag a bool.
    """
    try:
        names = json.loads(str(config.pop(SECAGG_NAMES)))
        keys = json.loads(str(config.pop(SECAGG_UPDATE_KEYS)))
        clip_norm = config.pop(SECAGG_CLIP_NORM)
        count = config.pop(SECAGG_COUNT)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"secure aggregation: malformed instructions ({exc})") from exc
    for what, value in (("names", names), ("update keys", keys)):
        if not (
            isinstance(value, list)
            and all(isinstance(v, str) for v in value)
            and len(set(value)) == len(value)
        ):
            raise ValueError(f"secure aggregation: the {what} must be a list of distinct strings")
    unknown = [k for k in keys if k not in names and BASE_PREFIX + k not in names]
    if unknown:
        raise ValueError(f"secure aggregation: update key(s) {unknown} were not sent")
    if not (finite_number(clip_norm) and clip_norm > 0):
        raise ValueError(f"secure aggregation: clip norm {clip_norm} must be finite and positive")
    if not isinstance(count, bool):
        raise ValueError(f"secure aggregation: the count flag {count} must be true or false")
    return names, keys, float(clip_norm), count


def clipped_update(
    trained: dict[str, np.ndarray],
    base: dict[str, np.ndarray],
    keys: list[str],
    clip_norm: float,
    count: bool,
) -> list[np.ndarray]:
    """[clip_C(u)_k for k in keys] (+ [C x 1[||u|| <= C]] when `count`), u = trained - base.

    The norm is of all the update's tensors together, as the server's clipping computes it.
    """
    missing = [k for k in keys if k not in trained or k not in base]
    if missing:
        raise ValueError(
            f"secure aggregation: the reply or the payload lacks {', '.join(missing)}; every "
            "node must send the same tensors"
        )
    update = [trained[k].astype(np.float64) - base[k].astype(np.float64) for k in keys]
    norm = float(np.sqrt(sum(float(np.square(u).sum()) for u in update)))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = [u * scale for u in update]
    if count:
        out.append(np.array([clip_norm if norm <= clip_norm else 0.0]))
    return out
