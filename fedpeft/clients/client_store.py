"""What a pooled simulated client keeps between rounds, on disk, keyed by its client id.

A client that keeps state between rounds (FLoRA's and RoLoRA's versions and stacks, Fed-SB's
and RoLoRA's frozen factors, SCAFFOLD's c_k, HetLoRA's rank, FedSA-LoRA's cached factors) keeps
it in its Flower `Context.state`. With one node per client, that is the node's context. In a
pooled simulation (client_pool.py) one node serves many clients, so each client's state is a
file, `<state dir>/clients/<c // 1000>/<c>.state`: the client's RecordDict as Flower serialises
it, written whole or not at all (durable_files.py) and held under the client's lock from load to
save, so that a client still running a round that timed out and the same client sampled in the
next round take turns rather than overwrite each other. Only clients that hold some state get a
state file (every client served gets an empty lock file beside it): the store grows with the
clients sampled, not with the population.

The store lives as long as one start of a simulation: `clear` empties it when a run starts or
resumes, so that, as with one node per client (whose `Context.state` is in memory), no client
holds state the server's checkpoint does not know of: a stale attempt's FLoRA stacks, or a round
trained after the last checkpoint, are never read. The server resends what clients need.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto  # pylint: disable=E0611
from google.protobuf.message import DecodeError

from fedpeft.durable_files import exclusive_lock, write_atomically
from fedpeft.errors import FedPeftError

#: clients per subdirectory, so that no directory holds more than this many files
SHARD = 1000


class ClientStateCorrupt(FedPeftError):
    """A client's state file exists but cannot be read: the client refuses to run without it."""


class ClientStore:
    """The state files of a pooled simulation's clients under `root` (`<state dir>/clients`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def clear(self) -> None:
        """Forget every client's state (a simulation starting or resuming; see the module doc)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def path(self, client: int) -> Path:
        """The file that holds `client`'s state."""
        return self.root / str(client // SHARD) / f"{client}.state"

    @contextlib.contextmanager
    def held(self, client: int) -> Iterator[RecordDict]:
        """`client`'s state for the block, saved back after it (locked across processes).

        The state is saved only when the block ends normally; a round that raised leaves the
        client's state as it was before the round.
        """
        path = self.path(client)
        with exclusive_lock(path.with_suffix(".lock")):
            state = self.load(client)
            before = recorddict_to_proto(state).SerializeToString(deterministic=True)
            yield state
            after = recorddict_to_proto(state).SerializeToString(deterministic=True)
            if after != before:
                write_atomically(path, lambda f: f.write(after))

    def load(self, client: int) -> RecordDict:
        """`client`'s state as last saved (empty for a client that has none)."""
        path = self.path(client)
        if not path.exists():
            return RecordDict()
        proto = RecordDictProto()
        try:
            proto.ParseFromString(path.read_bytes())
            return recorddict_from_proto(proto)
        except (DecodeError, ValueError, TypeError) as exc:
            raise ClientStateCorrupt(
                f"client {client}'s state file {path} cannot be read ({exc}); the client will not "
                "run on a state it cannot trust: delete the file to start it afresh, or restore it"
            ) from exc
