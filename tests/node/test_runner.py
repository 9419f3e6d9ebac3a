"""`fedpeft-clientapp` (fedpeft/node/runner.py): which ClientApp answers which message."""

import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.clients.secure_sum_mods import (
    SECAGG_CLIP_NORM,
    SECAGG_COUNT,
    SECAGG_NAMES,
    SECAGG_UPDATE_KEYS,
    is_key_stage,
    key_stage_app,
)
from fedpeft.privacy.policy import PolicyViolation
from tests.clients.test_secure_sum_mods import SETUP


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _message(configs: dict | None, kind: str = MessageType.TRAIN) -> Message:
    records = {RECORD_KEY_CONFIGS: ConfigRecord(configs)} if configs is not None else {}
    return Message(RecordDict(records), dst_node_id=7, message_type=kind)


def test_only_secagg_stages_that_train_nothing_are_key_stages():
    assert is_key_stage(_message(SETUP))
    assert is_key_stage(_message({Key.STAGE: Stage.UNMASK}))
    assert not is_key_stage(_message({Key.STAGE: Stage.COLLECT_MASKED_VECTORS}))
    assert not is_key_stage(_message(None))  # a plain train round
    assert not is_key_stage(_message(SETUP, MessageType.EVALUATE))


def test_the_key_stage_app_never_trains():
    """A server that labels a training stage as a key stage gets a refusal, not a round."""
    context = Context(1, 7, {}, RecordDict(), {})
    reply = key_stage_app(_message(SETUP), context)
    keys = set(reply.content.config_records[RECORD_KEY_CONFIGS])
    assert keys == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
    context.state.config_records["secaggplus_state"]["current_stage"] = Stage.SHARE_KEYS
    instructions = {SECAGG_NAMES: '["a"]', SECAGG_UPDATE_KEYS: '["a"]', SECAGG_CLIP_NORM: 1.0,
                    SECAGG_COUNT: False}  # fmt: skip
    fitins = FitIns(ndarrays_to_parameters([np.zeros(2)]), instructions)
    collect = compat.fitins_to_recorddict(fitins, keep_input=True)
    collect[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}
    )
    msg = Message(collect, dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(PolicyViolation, match="key stage reached the train handler"):
        key_stage_app(msg, context)


KEY_STAGE_ONLY = """
import sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.task_identity import TaskIdentity
from fedpeft.node import runner
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(%r)}), dst_node_id=7,
              message_type=MessageType.TRAIN)
runner._app_for(msg)(msg, Context(1, 7, {}, RecordDict(), {}))
print(sorted(m for m in ("torch", "transformers", "opacus", "peft") if m in sys.modules))
"""


def test_a_key_stage_is_answered_without_the_training_stack():
    """Each SecAgg+ key message starts a fresh process on a deployed node: it imports neither
    torch nor transformers, opacus or peft (about 8 s on a small CPU, three times a round)."""
    done = subprocess.run(
        [sys.executable, "-c", KEY_STAGE_ONLY % (SETUP,)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
