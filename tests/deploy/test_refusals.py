"""The deployed SuperLink refuses a SuperNode whose key is not registered, and a SuperNode that
does not trust the deployment's CA cannot connect; a registered node with the CA can (control)."""

import pytest

from fedpeft import certs
from tests.deploy.conftest import wait_for

EXIT_TIMEOUT = 90


def _exits(deployment, name, argv) -> tuple[int, str]:
    """Start a SuperNode that is expected to give up; return its exit status and log."""
    proc = deployment.start_node(name, argv)
    try:
        wait_for(lambda: proc.poll() is not None, EXIT_TIMEOUT, f"{name} to give up")
    finally:
        deployment.processes.stop(name)
    return proc.returncode, deployment.processes.log(name)


def test_supernode_with_an_unregistered_key_is_refused(deployment, tmp_path):
    keys = certs.make_node_keys(tmp_path, "intruder")
    before = deployment.nodes()
    argv = deployment.node_argv(
        "intruder", keys.private, "partition-id=0 num-partitions=2", max_retries=1
    )
    status, log = _exits(deployment, "intruder", argv)
    assert status != 0
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert deployment.nodes() == before


@pytest.mark.parametrize("with_ca", [False, True])
def test_supernode_needs_the_ca_certificate(deployment, tmp_path, with_ca):
    name = f"node-ca-{with_ca}".lower()
    keys = certs.make_node_keys(tmp_path, name)
    node_id = deployment.register(keys.public)
    argv = deployment.node_argv(
        name, keys.private, "partition-id=0 num-partitions=2", with_ca, max_retries=1
    )
    try:
        if not with_ca:
            status, log = _exits(deployment, name, argv)
            assert status != 0
            assert "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]
            assert deployment.nodes()[node_id] == "registered"  # never came online
        else:
            deployment.start_node(name, argv)
            deployment.wait_status(node_id, "online")
            deployment.processes.stop(name)
            deployment.wait_status(node_id, "offline")
    finally:
        if name in deployment.processes.running:
            deployment.processes.stop(name)
        deployment.flwr("supernode", "unregister", str(node_id), "deploy")
