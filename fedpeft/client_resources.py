"""Whether one simulated client fits this machine's CPUs and GPUs, checked before Ray starts.

Flower's simulation sizes its actor pool from Ray's resources; when not even one client fits
(`federation.client_cpus` above the CPU count, or `federation.client_gpus` > 0 on a machine with
no GPU) it crashes with "ActorPool is empty" after Ray has started. This check names the setting
instead. A run that attaches to a Ray cluster (RAY_ADDRESS, or a `ray start --head` cluster on
this machine) is not checked: the cluster's other nodes may have what this one lacks. What is
checked then is that the cluster answers at all (`check_ray_address`): otherwise Ray waits and
ends in a long traceback.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import torch
from ray._private.utils import get_num_cpus, read_ray_address

from fedpeft.errors import ConfigError


def attaches_to_cluster(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether Ray will join an existing cluster rather than start one on this machine.

    As `ray.init()` decides: RAY_ADDRESS, else the cluster `ray start` recorded on this machine.
    """
    return bool(environ.get("RAY_ADDRESS")) or read_ray_address() is not None


def check_client_resources(
    client_cpus: float, client_gpus: float, cpus: int | None = None, gpus: int | None = None
) -> None:
    """Raise a ConfigError if one client's share exceeds this machine's CPUs or GPUs."""
    cpus = get_num_cpus() if cpus is None else cpus
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if client_cpus > cpus:
        raise ConfigError(
            f"federation.client_cpus={client_cpus:g} but this machine has {cpus} CPUs, so no "
            f"client fits: set federation.client_cpus to at most {cpus}, or attach to a Ray "
            "cluster (RAY_ADDRESS, docs/scaling.md)"
        )
    if client_gpus > gpus:
        fix = "federation.client_gpus=0" if gpus == 0 else f"federation.client_gpus<={gpus}"
        raise ConfigError(
            f"federation.client_gpus={client_gpus:g} but this machine has {gpus} visible "
            f"GPU(s), so no client fits: set {fix}, or attach to a Ray cluster with GPUs "
            "(RAY_ADDRESS, docs/scaling.md)"
        )


#: Seconds to wait for a Ray cluster's GCS port to accept a connection.
CONNECT_TIMEOUT = 5.0


def check_ray_address(environ: Mapping[str, str] = os.environ) -> None:
    """Raise a ConfigError if RAY_ADDRESS names a cluster that nothing answers for.

    Accepts what `ray.init` does: `host:port` (the head's GCS, 6379 by default), `ray://host:port`
    (Ray Client, 10001 by default), `auto` (the cluster `ray start` recorded here) and `local`.
    """
    address = environ.get("RAY_ADDRESS", "").strip()
    if not address or address == "local":
        return
    fix = "start one with `ray start --head --port={port}` there, or unset RAY_ADDRESS to run on "
    fix += "this machine (docs/scaling.md)"
    if address == "auto":
        address = read_ray_address() or ""
        if not address:
            raise ConfigError(
                "RAY_ADDRESS=auto but no Ray cluster was started on this machine: run "
                "`ray start --head` first, or unset RAY_ADDRESS to run on this machine"
            )
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"RAY_ADDRESS={address} is not <host>:<port>: set it to the head node's address, "
            "e.g. RAY_ADDRESS=10.0.0.1:6379 (what `ray start --head` prints)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({reason}): "
            + fix.format(port=port)
        ) from exc
