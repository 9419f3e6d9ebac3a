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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError
from fedpeft.node.approval import APPROVAL_ENV, Approval

BIN = Path(sys.executable).parent
DEFAULT_RUNTIME_PORT = 9094

#: command-line option -> (node config key, type); each is documented in docs/deploy.md
OPTIONS: dict[str, tuple[str, type]] = {
    "data": ("data-path", str),
    "text_column": ("text-column", str),
    "label_column": ("label-column", str),
    "partition_id": ("partition-id", int),
    "num_partitions": ("num-partitions", int),
    "state_dir": ("state-dir", str),
    "device": ("device", str),
    "dtype": ("dtype", str),
    "model_path": ("model-path", str),
    "dp_epsilon": ("dp-epsilon", float),
    "dp_lifetime_epsilon": ("dp-lifetime-epsilon", float),
    "dp_delta": ("dp-delta", float),
    "dp_max_grad_norm": ("dp-max-grad-norm", float),
    "dp_noise_multiplier": ("dp-noise-multiplier", float),
    "dp_accountant": ("dp-accountant", str),
}


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register `fedpeft node` on the CLI's subparsers."""
    node = sub.add_parser("node", help="run a SuperNode that runs only the installed fedpeft")
    node.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, host:port")
    tls = node.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="the federation's CA certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    node.add_argument("--auth-key", type=Path, help="this node's private key (fedpeft certs node)")
    node.add_argument("--data", help="this node's own data file (csv, tsv, json, jsonl, parquet)")
    node.add_argument("--text-column", help="the data file's text column (default text)")
    node.add_argument("--label-column", help="the data file's label column (default label)")
    node.add_argument("--partition-id", type=int, help="demo: train on this partition ...")
    node.add_argument("--num-partitions", type=int, help="... of this many of the task's data")
    node.add_argument(
        "--state-dir", help="where the privacy ledger lives (keep it across restarts)"
    )
    node.add_argument("--device", help="cpu, cuda or cuda:<i> (default: the server's choice)")
    node.add_argument("--dtype", help="float32 or bfloat16 for this node's model")
    node.add_argument("--model-path", help="this node's copy of the base model (hf models)")
    node.add_argument("--dp-required", action="store_true", help="train only under DP-SGD")
    node.add_argument("--dp-epsilon", type=float, help="the most epsilon one run may spend")
    node.add_argument("--dp-lifetime-epsilon", type=float, help="the most over all runs")
    node.add_argument("--dp-delta", type=float, help="the largest delta accepted")
    node.add_argument("--dp-max-grad-norm", type=float, help="the largest clipping bound")
    node.add_argument("--dp-noise-multiplier", type=float, help="the smallest noise multiplier")
    node.add_argument("--dp-accountant", help="prv (default) or rdp")
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
    for option, (key, kind) in OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            config[key] = kind(value)
    if args.dp_required:
        config["dp-required"] = True
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


def main(argv: Sequence[str]) -> int:
    """For tests: parse `fedpeft node` arguments alone and run."""
    parser = argparse.ArgumentParser(prog="fedpeft")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["node", *argv]))
