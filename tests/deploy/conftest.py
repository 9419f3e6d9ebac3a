"""A real deployment on loopback: certificates, a SuperLink with TLS and node authentication,
registered SuperNodes and the `flwr` CLI, each with its own FLWR_HOME.

Every process is started in its own session and stopped by PID: its process group and every
descendant (Flower detaches some of its helpers into new sessions) get SIGTERM, then SIGKILL after
a grace period. Ports come from the OS; readiness is polled, never slept for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from fedpeft import cli

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SPY = Path(__file__).resolve().parent / "wire_spy"
CONNECTION = "deploy"
#: node-1's own data: more than the 200 examples of either server-side partition of DEPLOY_RUN.
NODE_1_ROWS = 250

#: The deployed runs: FAST_RUN's model and data, both nodes sampled every round.
DEPLOY_RUN = [
    "model=tiny_bert",
    "dataset=sst2",
    "dataset.max_train_examples=400",
    "dataset.max_test_examples=200",
    "federation.num_clients=2",
    "federation.min_clients=2",
    "federation.local_steps=3",
    "partition=iid",
    "train.max_length=32",
    "strategy=fedavg",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Poll `check` until it returns something truthy; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (Linux /proc)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Processes:
    """Start processes with their output in log files; stop each by PID with its descendants."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, grace: float = 15.0) -> None:
        """SIGTERM the process, its group and its descendants; SIGKILL what outlives `grace`."""
        proc = self.running.pop(name)
        pids = [proc.pid, *descendants(proc.pid)]
        # One SIGTERM per process: a second one would interrupt a SuperNode's graceful exit, in
        # which it tells the SuperLink it is leaving.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        for pid in pids[1:]:
            if _group(pid) != proc.pid:
                _signal(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=grace)

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Deployment:
    """A SuperLink on loopback with TLS and node authentication, its nodes and the CLI."""

    root: Path
    certs: Path
    processes: Processes
    env: dict[str, str]
    fleet_port: int
    control_port: int
    node_ids: dict[str, int] = field(default_factory=dict)
    node_args: dict[str, list[str]] = field(default_factory=dict)
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    run_dirs: dict[int, Path] = field(default_factory=dict)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this deployment's connection."""
        env = {**self.env, "FLWR_HOME": str(self.root / "cli")}
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def flwr_json(self, *args: str, timeout: float = 120) -> dict:
        result = self.flwr(*args, "--format", "json", timeout=timeout)
        start = result.stdout.find("{")
        if result.returncode != 0 or start < 0:
            pytest.fail(f"flwr {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return json.loads(result.stdout[start:])

    def register(self, public_key: Path) -> int:
        return int(self.flwr_json("supernode", "register", str(public_key), CONNECTION)["node-id"])

    def nodes(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline", ...) as the SuperLink sees it."""
        listed = self.flwr_json("supernode", "ls", CONNECTION)["nodes"]
        return {int(n["node-id"]): n["status"] for n in listed}

    def node_argv(
        self,
        name: str,
        key: Path | None,
        node_config: str,
        root_certificates: bool = True,
        max_retries: int | None = None,
    ) -> list[str]:
        argv = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.fleet_port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
        ]
        if root_certificates:
            argv += ["--root-certificates", str(self.certs / "ca.crt")]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        return argv

    def start_node(self, name: str, argv: list[str]) -> subprocess.Popen:
        home = self.root / name
        home.mkdir(exist_ok=True)
        self.node_args[name] = argv
        env = {**self.env, **self.node_env.get(name, {}), "FLWR_HOME": str(home)}
        return self.processes.start(name, argv, env)

    def wait_status(self, node_id: int, status: str, timeout: float = 90) -> None:
        wait_for(
            lambda: self.nodes().get(node_id) == status,
            timeout,
            f"node {node_id} to be {status}",
            interval=1.0,
        )

    def start_run(self, overrides: list[str]) -> int:
        """`flwr run . deploy --run-config "overrides='...'"`; returns the run id."""
        joined = " ".join(overrides)
        assert "'" not in joined, "a TOML literal string cannot hold a single quote"
        run_config = f"overrides='{joined}'"
        started = self.flwr_json("run", str(REPO), CONNECTION, "--run-config", run_config)
        run_id = int(started["run-id"])
        for override in overrides:
            if override.startswith("run_dir="):
                self.run_dirs[run_id] = Path(override.split("=", 1)[1])
        return run_id

    def run_info(self, run_id: int) -> dict:
        return self.flwr_json("ls", CONNECTION, "--run-id", str(run_id))["runs"][0]

    def wait_run(self, run_id: int, timeout: float = 300) -> dict:
        """Poll until the run has finished; return its `flwr ls` entry.

        Each `flwr ls` is a Python process (about 2 s of CPU here, as much as a node's round):
        while the run's summary.json has not appeared, the SuperLink is asked only every 15 s
        (to see a run that fails without one), then every 0.5 s until it says finished.
        """
        summary = self.run_dirs.get(run_id, Path("/nonexistent")) / "summary.json"
        asked = [0.0]

        def finished() -> dict | None:
            if not summary.exists() and time.monotonic() < asked[0] + 15:
                return None
            asked[0] = time.monotonic()
            info = self.run_info(run_id)
            return info if info["status"].startswith("finished") else None

        return wait_for(finished, timeout, f"run {run_id} to finish", interval=0.5)


def _node_data(path: Path, data_dir: Path) -> Path:
    """A node's own CSV: NODE_1_ROWS SST-2 sentences, labels spelled as the server's names."""
    frame = pd.read_csv(data_dir / "sst2" / "train.tsv", sep="\t", nrows=NODE_1_ROWS)
    frame["label"] = frame["label"].map({0: "negative", 1: "positive"})
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="package")  # torn down when the deploy tests end: idle nodes poll
def deployment(tmp_path_factory, data_dir) -> Iterator[Deployment]:
    """A SuperLink with TLS and node authentication and two registered SuperNodes: node-1 on its
    own CSV file in bfloat16 on the CPU, node-2 on partition 1 of 2 of the task's data set.

    node-1 overclaims its example count in one local round while the file `overclaim` (the
    fixture's `overclaim_flag`) exists, node-2 drops out of one while `drop` (`drop_flag`)
    exists: see wire_spy/sitecustomize.py."""
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    for argv in (
        ["certs", "ca", "--out", str(certs)],
        ["certs", "server", "--out", str(certs), "--host", "127.0.0.1"],
        ["certs", "node", "node-1", "node-2", "--out", str(certs / "keys")],
    ):
        assert cli.main(argv) == 0
    env = {
        **os.environ,
        "FEDPEFT_DATA_DIR": str(data_dir),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # loopback only: no call home to flower.ai
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SPY), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "FEDPEFT_TEST_WIRE_LOG": str(root / "wire.jsonl"),
        "FEDPEFT_TEST_HOLD": str(root / "hold"),
        # Flower polls for messages every 3 s (SuperNode, grid) and 1 s (SuperExec): 0.5 s here
        "FEDPEFT_TEST_FAST_POLL": "0.5",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5",
        # The SuperLink starts flower-superexec by name: find it beside this interpreter.
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    }
    processes = Processes(root)
    deploy = Deployment(root, certs, processes, env, free_port(), free_port())
    (root / "superlink").mkdir()
    (root / "cli").mkdir()
    (root / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{deploy.control_port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    try:
        superlink = processes.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(certs / "ca.crt"),
                "--ssl-certfile",
                str(certs / "server.pem"),
                "--ssl-keyfile",
                str(certs / "server.key"),
                "--enable-supernode-auth",
                "--fleet-api-address",
                f"127.0.0.1:{deploy.fleet_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(deploy.control_port),
                "--disable-runtime-dependency-installation",
            ],
            {**env, "FLWR_HOME": str(root / "superlink")},
        )

        def listening() -> bool:
            if superlink.poll() is not None:
                pytest.fail(f"the SuperLink exited:\n{processes.log('superlink')[-3000:]}")
            return _port_open(deploy.fleet_port) and _port_open(deploy.control_port)

        wait_for(listening, 60, "the SuperLink to listen")
        csv = _node_data(root / "node-1.csv", data_dir)
        deploy.node_env["node-1"] = {"FEDPEFT_TEST_OVERCLAIM": str(overclaim_flag(deploy))}
        deploy.node_env["node-2"] = {"FEDPEFT_TEST_DROP": str(drop_flag(deploy))}
        (root / "hold").mkdir()
        configs = {
            "node-1": f'data-path="{csv}" text-column="sentence" device="cpu" dtype="bfloat16" '
            f'state-dir="{state_dir(deploy, "node-1")}"',
            "node-2": f'partition-id=1 num-partitions=2 state-dir="{state_dir(deploy, "node-2")}"',
        }
        for name, node_config in configs.items():
            key = certs / "keys" / f"{name}.key"
            deploy.node_ids[name] = deploy.register(key.with_suffix(".pub"))
            deploy.start_node(name, deploy.node_argv(name, key, node_config))
        for node_id in deploy.node_ids.values():
            deploy.wait_status(node_id, "online")
        yield deploy
    finally:
        processes.stop_all()


def state_dir(deploy: Deployment, name: str) -> Path:
    """Where the node `name` keeps its privacy ledgers (node config state-dir)."""
    return deploy.root / f"{name}-state"


def hold_round(deploy: Deployment, server_round: int) -> Path:
    """While this file exists, the ServerApp waits before sampling round `server_round`."""
    return deploy.root / "hold" / f"round-{server_round}"


def overclaim_flag(deploy: Deployment) -> Path:
    """While this file exists, node-1's next local round claims one example more than it has."""
    return deploy.root / "overclaim"


def drop_flag(deploy: Deployment) -> Path:
    """While this file exists, node-2's next local round fails, as a node dropping out."""
    return deploy.root / "drop"


def history(run_dir: Path) -> list[dict]:
    """The rows of a run folder's history.csv written so far."""
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    try:
        return pd.read_csv(path).to_dict("records")
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return []
