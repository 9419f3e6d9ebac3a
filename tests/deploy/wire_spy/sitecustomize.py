"""Test instrumentation for the deployed ServerApp: log what every train message carries.

The deploy tests put this folder on the SuperLink's PYTHONPATH with FEDPEFT_TEST_WIRE_LOG set, so
Python loads it in every process the SuperLink starts, the ServerApp process included. It patches
nothing until fedpeft's strategy base module is imported there, then wraps `configure_train` and
`aggregate_train` to append one JSON line per message sent and per reply received: the records it
carries, each array's key, shape, dtype and size, the config keys and the metrics.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys

_TARGET = "fedpeft.strategies.base"
_LOG = os.environ.get("FEDPEFT_TEST_WIRE_LOG")


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


def _patch(module) -> None:
    cls = module.LowRankStrategy
    configure, aggregate = cls.configure_train, cls.aggregate_train

    def configure_train(self, server_round, *args, **kwargs):
        messages = list(configure(self, server_round, *args, **kwargs))
        _write([_describe("down", server_round, m) for m in messages])
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        _write([_describe("up", server_round, m) for m in replies])
        return aggregate(self, server_round, replies)

    cls.configure_train, cls.aggregate_train = configure_train, aggregate_train


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
