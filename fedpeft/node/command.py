"""`fedpeft node`: a SuperNode that runs only the installed fedpeft, with its data and policy.

One command for a node operator. It checks the node's settings (policy, caps, data file) before
anything starts, then runs two Flower processes and stops both when either stops or on Ctrl-C:

- `flower-supernode --isolation process`: connects to the SuperLink (TLS with the CA
  certificate, authenticated with the node's key) and serves messages on a local runtime API,
  but starts no ClientApp itself;
- Flower's SuperExec (node/superexec.py) on that API, which starts `fedpeft-clientapp`
  (node/runner.py) for every message: the installed fedpeft's ClientApp, never the bundle's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError
from fedpeft.node.approval import APPROVAL_ENV, Approval

BIN = Path(sys.executable).parent
DEFAULT_RUNTIME_PORT = 9094

#: command-line option -> (node config key it sets, type, help); docs/deploy.md documents each key
OPTIONS: dict[str, tuple[str, type, str]] = {
    "--data": ("data-path", str, "this node's own data file (csv, tsv, json, jsonl, parquet)"),
    "--text-column": ("text-column", str, "the data file's text column (default text)"),
    "--label-column": ("label-column", str, "the data file's label column (default label)"),
    "--partition-id": ("partition-id", int, "demo: train on this partition ..."),
    "--num-partitions": ("num-partitions", int, "... of this many of the task's data"),
    "--state-dir": ("state-dir", str, "where the privacy ledger lives (keep it across restarts)"),
    "--device": ("device", str, "cpu, cuda or cuda:<i> (default: the server's choice)"),
    "--dtype": ("dtype", str, "float32 or bfloat16 for this node's model"),
    "--model-path": ("model-path", str, "this node's copy of the base model (hf models)"),
    "--dp-epsilon": ("dp-epsilon", float, "the most epsilon one run may spend"),
    "--dp-lifetime-epsilon": ("dp-lifetime-epsilon", float, "the most over all runs"),
    "--dp-delta": ("dp-delta", float, "the largest delta accepted"),
    "--dp-max-grad-norm": ("dp-max-grad-norm", float, "the largest clipping bound"),
    "--dp-noise-multiplier": ("dp-noise-multiplier", float, "the smallest noise multiplier"),
    "--dp-accountant": ("dp-accountant", str, "prv (default) or rdp"),
    "--secagg-min-threshold": (
        "secagg-min-threshold",
        int,
        "the fewest SecAgg+ key shares that may rebuild this node's keys (default 2)",
    ),
}


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register `fedpeft node` on the CLI's subparsers."""
    node = sub.add_parser("node", help="run a SuperNode that runs only the installed fedpeft")
    node.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, host:port")
    tls = node.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="the federation's CA certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    node.add_argument("--auth-key", type=Path, help="this node's private key (fedpeft certs node)")
    for flag, (key, kind, text) in OPTIONS.items():
        node.add_argument(flag, dest=key, type=kind, help=text)
    node.add_argument("--dp-required", action="store_true", help="train only under DP-SGD")
    node.add_argument(
        "--secagg-required",
        action="store_true",
        help="send updates only inside secure aggregation (SecAgg+)",
    )
    node.add_argument(
        "--node-config", default="", help='more node config, e.g. "max-batch-size=64"'
    )
    node.add_argument(
        "--approve-fab", action="append", default=[], help="only this bundle hash (repeatable)"
    )
    node.add_argument(
        "--approve-version", help="the fedpeft version a run's bundle must name (default: this)"
    )
    node.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT,
                      help="local port of the SuperNode's runtime API")  # fmt: skip


def node_config(args: argparse.Namespace) -> dict[str, Any]:
    """The node config the options describe, checked as every message will check it."""
    from fedpeft.clients import task_guard
    from fedpeft.privacy.policy import NodePolicy

    config: dict[str, Any] = _parse_extra(args.node_config)
    for key, _, _ in OPTIONS.values():
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.dp_required:
        config["dp-required"] = True
    if args.secagg_required:
        config["secagg-required"] = True
    if "data-path" in config:
        path = Path(config["data-path"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"--data {path} is not a file: give this node's own data file")
        config["data-path"] = str(path.resolve())
    elif "partition-id" not in config:
        raise ConfigError("a node needs data: --data <its file> (or --partition-id for a demo)")
    NodePolicy.from_node_config(config)  # dp-required without dp-epsilon etc.: refused now
    task_guard.node_limits(config)
    return config


def _parse_extra(text: str) -> dict[str, Any]:
    """`key=value` pairs, parsed by the function Flower's --node-config goes through."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except ValueError as exc:
        raise ConfigError(
            f"--node-config {text!r} is not key=value pairs ({exc}): quote strings, e.g. "
            'max-batch-size=64 device="cpu"'
        ) from exc


def render_node_config(config: Mapping[str, Any]) -> str:
    """A node config as Flower's --node-config string: space-separated TOML key=value pairs.

    Flower's parser takes a quoted value up to the next quote of its kind, without escapes, so a
    string is written as a TOML literal ('...'), or basic ("...") when it holds a single quote.
    """
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int | float):
            rendered = repr(value)
        elif "'" not in str(value):
            rendered = f"'{value}'"
        elif '"' not in str(value) and "\\" not in str(value):
            rendered = f'"{value}"'
        else:
            raise ConfigError(
                f"node config {key}={value!r} holds both kinds of quote, which Flower's "
                "--node-config cannot carry: rename the path"
            )
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


def commands(args: argparse.Namespace, config: Mapping[str, Any]) -> tuple[list, list]:
    """The SuperNode's and the SuperExec's command lines."""
    runtime = f"127.0.0.1:{args.runtime_port}"
    supernode = [
        str(BIN / "flower-supernode"),
        "--superlink",
        args.superlink,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(args.runtime_port),
        "--node-config",
        render_node_config(config),
    ]
    if args.insecure:
        supernode.append("--insecure")
    else:
        supernode += ["--root-certificates", str(args.root_certificates)]
    if args.auth_key is not None:
        supernode += ["--auth-supernode-private-key", str(args.auth_key)]
    superexec = [sys.executable, "-m", "fedpeft.node.superexec", "--runtime-api-address",
                 runtime, "--insecure"]  # fmt: skip
    return supernode, superexec


def run(args: argparse.Namespace) -> int:
    """Start the SuperNode and its SuperExec; return when either stops (or on SIGINT/SIGTERM)."""
    config = node_config(args)
    approval = Approval(
        version=args.approve_version or Approval().version, fab_hashes=frozenset(args.approve_fab)
    )
    supernode, superexec = commands(args, config)
    env = {**os.environ, APPROVAL_ENV: approval.to_env()}
    print(f"fedpeft node: node config {render_node_config(config)}", file=sys.stderr)
    procs = [subprocess.Popen(supernode, env=env)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        time.sleep(1.0)  # let the SuperNode open its runtime API before SuperExec polls it
        procs.append(subprocess.Popen(superexec, env=env))
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    return 0 if stopping else next((c for c in codes if c), 0)
