"""Test instrumentation for the deployed processes: a wire log on the server, a lying client.

The deploy tests put this folder on every process's PYTHONPATH, so Python loads it in every
process the SuperLink and the SuperNodes start. It patches nothing until the module it targets is
imported there:
- with FEDPEFT_TEST_WIRE_LOG set (the ServerApp): wraps the strategy base's `configure_train` and
  `aggregate_train`, and the reading of identity answers, to append one JSON line per message
  sent and per reply received: the records it carries, each array's key, shape, dtype and size,
  the config keys and the metrics;
- with FEDPEFT_TEST_OVERCLAIM set to a file's path (one SuperNode's ClientApps): while that file
  exists, the next local round (private or not) claims one example more than the node holds, and
  removes the file, so that exactly one reply overclaims when the test creates it;
- with FEDPEFT_TEST_DROP set to a file's path (one SuperNode's ClientApps): while that file
  exists, the next local round fails (and removes the file), as a node that drops out in the
  middle of a round: under SecAgg+ it never sends its masked vector;
- with FEDPEFT_TEST_FAST_POLL set to a number of seconds (every deployed process): Flower's two
  hard-coded idle polls, the SuperNode waiting for a message and the ServerApp's grid waiting for
  replies (3 s each), wait at most that long; the SuperExec's own poll is set by Flower's
  FLWR_SUPEREXEC_TASK_POLL_INTERVAL. Only the deploy tests' latency changes, not what is sent;
- with FEDPEFT_TEST_HOLD set to a folder (the ServerApp): while `<folder>/round-<N>` exists, the
  server waits before it samples the clients of round N, so that a test can restart a SuperNode
  between two rounds without racing the server.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable

_LOG = os.environ.get("FEDPEFT_TEST_WIRE_LOG")
_OVERCLAIM = os.environ.get("FEDPEFT_TEST_OVERCLAIM")
_HOLD = os.environ.get("FEDPEFT_TEST_HOLD")
_DROP = os.environ.get("FEDPEFT_TEST_DROP")
_FAST_POLL = os.environ.get("FEDPEFT_TEST_FAST_POLL")
#: Longest a held round waits for its file to go (the test fails long before).
_HOLD_LIMIT_S = 600


def _describe(direction: str, server_round: int, msg) -> dict:
    row = {"direction": direction, "round": server_round, "error": msg.has_error()}
    if msg.has_error():
        return {**row, "reason": msg.error.reason}
    content = msg.content
    return {
        **row,
        "node": msg.metadata.dst_node_id if direction == "down" else msg.metadata.src_node_id,
        "arrays": {
            name: {
                key: {"shape": list(a.shape), "dtype": a.dtype, "data_len": len(a.data)}
                for key, a in record.items()
            }
            for name, record in content.array_records.items()
        },
        "configs": {n: sorted(r.keys()) for n, r in content.config_records.items()},
        "metrics": {n: dict(r) for n, r in content.metric_records.items()},
    }


def _write(rows: list[dict]) -> None:
    with open(_LOG, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _patch_strategy(module) -> None:
    cls = module.LowRankStrategy
    configure, aggregate = cls.configure_train, cls.aggregate_train

    def configure_train(self, server_round, *args, **kwargs):
        if _HOLD:
            deadline = time.monotonic() + _HOLD_LIMIT_S
            while os.path.exists(os.path.join(_HOLD, f"round-{server_round}")):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        messages = list(configure(self, server_round, *args, **kwargs))
        _write([_describe("down", server_round, m) for m in messages])
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        _write([_describe("up", server_round, m) for m in replies])
        return aggregate(self, server_round, replies)

    cls.configure_train, cls.aggregate_train = configure_train, aggregate_train


def _patch_identity(module) -> None:
    read = module.read_answer

    def read_answer(msg):
        _write([_describe("identity", 0, msg)])
        return read(msg)

    module.read_answer = read_answer


def _overclaiming(train: Callable) -> Callable:
    def trained(*args, **kwargs):
        result = train(*args, **kwargs)
        try:
            os.remove(_OVERCLAIM)
        except FileNotFoundError:
            return result
        return dataclasses.replace(result, num_examples=result.num_examples + 1)

    return trained


def _dropping(train: Callable) -> Callable:
    def trained(*args, **kwargs):
        try:
            os.remove(_DROP)
        except FileNotFoundError:
            return train(*args, **kwargs)
        raise RuntimeError("test: this node drops out in the middle of its local round")

    return trained


def _lying(train: Callable) -> Callable:
    if _OVERCLAIM:
        train = _overclaiming(train)
    return _dropping(train) if _DROP else train


def _patch_training(module) -> None:
    module.train_steps = _lying(module.train_steps)


def _patch_private_training(module) -> None:
    module.train_private = _lying(module.train_private)


class _ShortSleeps:
    """A `time` module whose sleep is capped at FEDPEFT_TEST_FAST_POLL seconds."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, float(_FAST_POLL)))


def _patch_polling(module) -> None:
    module.time = _ShortSleeps()


class _Finder(importlib.abc.MetaPathFinder):
    """Runs a patch on a module right after its first import."""

    def __init__(self, patches: dict[str, Callable]):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        patch = self.patches.pop(name, None)
        if patch is None:
            return None
        spec = importlib.util.find_spec(name)  # asks this finder again, which now passes
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module) -> None:
            run(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


_PATCHES: dict[str, Callable] = {}
if _LOG:
    _PATCHES["fedpeft.strategies.base"] = _patch_strategy
    _PATCHES["fedpeft.identity"] = _patch_identity
if _OVERCLAIM or _DROP:
    _PATCHES["fedpeft.training"] = _patch_training
    _PATCHES["fedpeft.privacy.dp_sgd"] = _patch_private_training
if _FAST_POLL:
    _PATCHES["flwr.supernode.start_client_internal"] = _patch_polling
    _PATCHES["flwr.superlink.grid.http_grid"] = _patch_polling
if _PATCHES:
    sys.meta_path.insert(0, _Finder(_PATCHES))
