"""The check that one simulated client fits the machine, before Ray starts."""

import socket

import pytest
import torch

from fedpeft.cli import main
from fedpeft.client_resources import (
    attaches_to_cluster,
    check_client_resources,
    check_ray_address,
)
from fedpeft.errors import ConfigError


def test_a_client_share_the_machine_has_passes():
    check_client_resources(2, 0.0, cpus=2, gpus=0)
    check_client_resources(1, 0.25, cpus=16, gpus=1)


@pytest.mark.parametrize(
    ("cpus_gpus", "share", "message"),
    [
        ((2, 0), (4, 0.0), "client_cpus=4 but this machine has 2 CPUs.*at most 2"),
        ((2, 0), (1, 0.5), "client_gpus=0.5 but this machine has 0 visible GPU.*client_gpus=0,"),
        ((16, 1), (1, 2), "client_gpus=2 but this machine has 1 visible GPU.*client_gpus<=1"),
    ],
)
def test_a_client_that_cannot_fit_names_the_setting(cpus_gpus, share, message):
    with pytest.raises(ConfigError, match=message):
        check_client_resources(*share, cpus=cpus_gpus[0], gpus=cpus_gpus[1])


def test_a_ray_cluster_is_not_checked():
    assert attaches_to_cluster({"RAY_ADDRESS": "10.0.0.1:6379"})


@pytest.mark.skipif(
    torch.cuda.is_available() or attaches_to_cluster(), reason="needs a machine without GPUs"
)
def test_simulate_refuses_gpu_clients_without_a_gpu(capsys):
    assert main(["simulate", "model=tiny_bert", "federation.client_gpus=0.5"]) == 2
    err = capsys.readouterr().err
    assert "fedpeft: error: federation.client_gpus=0.5" in err and "ActorPool" not in err


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_ray_address_is_checked_for_an_answer():
    port = _closed_port()
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers"):
        check_ray_address({"RAY_ADDRESS": f"127.0.0.1:{port}"})
    with pytest.raises(ConfigError, match="is not <host>:<port>"):
        check_ray_address({"RAY_ADDRESS": "headnode"})
    with socket.socket() as listening:  # something answers: Ray itself is left to judge it
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_ray_address({"RAY_ADDRESS": f"ray://127.0.0.1:{listening.getsockname()[1]}"})
    check_ray_address({"RAY_ADDRESS": "local"})
    check_ray_address({})


def test_simulate_with_a_ray_address_of_nothing_is_one_line_and_exit_2(capsys, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["simulate", "model=tiny_bert"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedpeft: error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster")
    assert "ray start --head" in err and len(err.splitlines()) == 1
