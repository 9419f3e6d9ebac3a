"""`fedpeft node` against a hostile bundle: a real SuperLink (TLS, node authentication) and two
nodes started the way docs/deploy.md teaches. A run whose bundle carries a modified ClientApp
trains on both nodes with the nodes' own code (the bundle's never runs). (A stock
`flower-supernode` runs the same modified bundle's code: the issue-26 note shows it;
tests/deploy/test_end_to_end.py runs honest bundles on stock nodes; the pin that refuses other
bundles is tested in tests/node/test_approval.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fedpeft import certs
from tests.deploy.conftest import (
    BIN,
    CONNECTION,
    DEPLOY_RUN,
    REPO,
    Deployment,
    Processes,
    _port_open,
    free_port,
    history,
    wait_for,
)

#: the line the modified bundle adds to its ClientApp module: a file per process that imports it
MARKER = (
    "import os as _os, pathlib as _pl\n"
    "_pl.Path({root!r}, 'bundle-ran-' + _pl.Path(_os.environ.get('FLWR_HOME', 'x')).name)"
    ".write_text('the bundle code ran')\n"
)


def _bundle(tmp: Path, root: Path) -> Path:
    """A copy of the repository whose ClientApp module writes a marker when imported."""
    out = tmp / "bundle"
    files = subprocess.run(
        ["git", "ls-files", "fedpeft", "pyproject.toml", "README.md"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, out / name)
    app = out / "fedpeft" / "clients" / "client_app.py"
    app.write_text(MARKER.format(root=str(root)) + app.read_text())
    return out


@pytest.fixture(scope="module")
def node_deployment(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("node-command")
    cert_dir = root / "certs"
    certs.make_ca(cert_dir)
    certs.make_server_cert(cert_dir, cert_dir, hosts=["127.0.0.1"])
    env = {
        **os.environ,
        "FEDPEFT_DATA_DIR": str(data_dir),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    }
    processes = Processes(root)
    deploy = Deployment(root, cert_dir, processes, env, free_port(), free_port())
    for folder in ("superlink", "cli"):
        (root / folder).mkdir()
    (root / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{deploy.control_port}"\n'
        f'root-certificates = "{cert_dir / certs.CA_CERT}"\n'
    )
    try:
        processes.start(
            "superlink",
            [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(cert_dir / certs.CA_CERT),
             "--ssl-certfile", str(cert_dir / "server.pem"), "--ssl-keyfile",
             str(cert_dir / "server.key"), "--enable-supernode-auth", "--fleet-api-address",
             f"127.0.0.1:{deploy.fleet_port}", "--host", "127.0.0.1", "--port",
             str(deploy.control_port), "--disable-runtime-dependency-installation"],
            {**env, "FLWR_HOME": str(root / "superlink")},
        )  # fmt: skip
        wait_for(
            lambda: _port_open(deploy.fleet_port) and _port_open(deploy.control_port),
            60,
            "the SuperLink to listen",
        )
        for i in (0, 1):
            name = f"node-{i}"
            keys = certs.make_node_keys(cert_dir / "keys", name)
            deploy.node_ids[name] = deploy.register(keys.public)
            deploy.start_node(
                name,
                [str(BIN / "fedpeft"), "node", "--superlink", f"127.0.0.1:{deploy.fleet_port}",
                 "--root-certificates", str(cert_dir / certs.CA_CERT), "--auth-key",
                 str(keys.private), "--partition-id", str(i), "--num-partitions", "2",
                 "--state-dir", str(root / f"{name}-state"), "--runtime-port",
                 str(free_port())],
            )  # fmt: skip
        for node_id in deploy.node_ids.values():
            deploy.wait_status(node_id, "online")
        yield deploy
    finally:
        processes.stop_all()


def _run(deploy: Deployment, bundle: Path, run_dir: Path) -> list[dict]:
    overrides = " ".join([*DEPLOY_RUN, "federation.rounds=1", f"run_dir={run_dir}"])
    started = deploy.flwr_json(
        "run", str(bundle), CONNECTION, "--run-config", f"overrides='{overrides}'"
    )
    info = deploy.wait_run(int(started["run-id"]), timeout=400)
    assert info["status"] == "finished:completed", info.get("status-details")
    return history(run_dir)


def test_a_bundle_with_its_own_client_code_never_runs_it_on_a_fedpeft_node(
    node_deployment, tmp_path
):
    bundle = _bundle(tmp_path, node_deployment.root)
    rows = _run(node_deployment, bundle, tmp_path / "run")
    print(f"modified bundle on fedpeft nodes: {rows[1]}")
    assert rows[1]["sampled"] == 2 and rows[1]["replied"] == 2  # both trained...
    ran = sorted(p.name for p in node_deployment.root.glob("bundle-ran-*"))
    assert not [name for name in ran if name.startswith("bundle-ran-node-")], ran  # ...not it
    for name in node_deployment.node_ids:
        log = node_deployment.processes.log(name)
        assert "the installed fedpeft ClientApp handles run" in log
