"""The roster: who the server's nodes are, what they declared, and which of them a round samples.

Nodes are known by their Flower node id, which a simulation draws at random in every process.
Once the server has learnt a node's stable identity (its data partition, fedpeft/identity.py),
sampling, reply order and per-client records follow that identity instead, so that a run is
reproducible and a resumed run picks up where it stopped. The roster also keeps what a client is
known by between rounds: the example count it declared (reply screening holds its replies'
claims to it: screening.py, declared.py), the
rank it was assigned, the version of the state it holds for a method that keeps some on clients,
and whether it has spent its privacy budget (it is not sampled again).

In a pooled simulation (client_pool.py) the node ids the server sees are client ids 0..N-1 and
`population` is N: sampling draws client ids without listing the population (`Eligible`), so a
round costs the clients it samples whatever N is, and a client's example count comes from the
server's own partitioning (`count`), or from an identity query where the clients' data differs
from it (an audit's canaries).

The roster is plain data and the rules over it; it knows no strategy. A deployment's server loop
(server_app.py) and a strategy's `configure_train` share it.
"""

from __future__ import annotations

import bisect
import random
import time
from collections.abc import Callable, Mapping, Sequence
from logging import WARNING
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from flwr.supercore import log

from fedpeft import identity
from fedpeft.protocol import BUDGET_EXHAUSTED


class Roster:
    """The nodes of one run: identities, declarations, ranks, state versions, spent budgets.

    Parameters
    ----------
    seed : int
        Seed of the node sampling, so that a run is reproducible.
    track_versions : bool
        Whether clients hold per-node state whose version the server tracks (a method's
        `version_metric`); a failed node's version then falls back to 0.
    """

    def __init__(self, seed: int, track_versions: bool = False) -> None:
        self.rng = random.Random(seed)
        self.track_versions = track_versions
        #: node id -> stable identity (partition id or registered node id)
        self.identities: dict[int, int] = {}
        #: node id -> the example count it declared with its identity
        self.declared: dict[int, int] = {}
        #: identity -> rank assigned at its first sampling (per-client ranks)
        self.node_ranks: dict[int, int] = {}
        #: node id -> version of the per-node state the node reported holding
        self.versions: dict[int, int] = {}
        #: identities that spent their privacy budget (or whose ledger reset): never sampled again
        self.exhausted: set[int] = set()
        #: node id -> the name a not yet identified simulated node will answer with (its position
        #: in Flower's registration order, identity.registration_names)
        self.expected_names: Mapping[int, int] = MappingProxyType({})
        #: nodes connected when the last round was sampled
        self.connected = 0
        #: the population N of a pooled simulation, whose node ids are client ids 0..N-1
        self.population: int | None = None
        #: a pooled client's example count (None: ask the client, identity.ask)
        self.count: Callable[[int], int] | None = None

    def identify(
        self, identities: Mapping[int, int], declared: Mapping[int, int] | None = None
    ) -> None:
        """Learn node id -> stable identity and node id -> declared example count for more nodes.

        A node that takes an identity over (a SuperNode restarted under a new node id) replaces
        the node that held it, its declaration included.
        """
        taken = set(identities.values())
        gone = {n for n, m in self.identities.items() if m in taken}
        self.identities = {n: m for n, m in self.identities.items() if n not in gone}
        self.declared = {n: c for n, c in self.declared.items() if n not in gone}
        self.identities.update(identities)
        self.declared.update(declared or {})

    def identify_new(
        self, grid: Grid, asked: set[int], task: Mapping[str, Any], timeout: float
    ) -> None:
        """Ask the connected nodes not in `asked` (then added to it) who they are."""
        connected = set(grid.get_node_ids())
        new = sorted(connected - asked)
        if not new:
            return
        asked.update(new)
        held = {n: m for n, m in self.identities.items() if n in connected}
        self.identify(*identity.ask(grid, new, task, timeout, held))

    def member(self, node_id: int) -> int:
        """The node's stable identity when known, else its node id."""
        return self.identities.get(node_id, node_id)

    def declared_by_member(self) -> dict[str, int]:
        """Declared example counts by identity (as strings), for the run's summary."""
        return {str(self.member(n)): c for n, c in sorted(self.declared.items())}

    def assign_rank(self, node_id: int, ranks: Sequence[int]) -> int:
        """ranks[i % n] for the i-th client first sampled, kept for the run and across resumes."""
        member = self.member(node_id)
        if member not in self.node_ranks:
            self.node_ranks[member] = int(ranks[len(self.node_ranks) % len(ranks)])
        return self.node_ranks[member]

    def order(self, node_id: int) -> tuple[int, int, int]:
        """Sort key: a node's identity, else the name it is expected to answer, else its node id."""
        if node_id in self.identities:
            return (0, self.identities[node_id], node_id)
        if node_id in self.expected_names:
            return (0, self.expected_names[node_id], node_id)
        return (1, node_id, node_id)

    def record_version(self, node_id: int, value: Any) -> None:
        """Remember the state version a node reports (0 when it reports none or nonsense)."""
        if not self.track_versions:
            return
        ok = isinstance(value, int | float) and value >= 0 and value == int(value)
        self.versions[node_id] = int(value) if ok else 0

    def record_failure(self, node_id: int, reason: str) -> None:
        """A node failed or timed out: it may have lost its state, and may have spent its budget."""
        if BUDGET_EXHAUSTED in reason:
            self.exhausted.add(self.member(node_id))
        if self.track_versions:
            self.versions[node_id] = 0

    def sample(
        self,
        grid: Grid,
        *,
        fraction: float,
        min_clients: int,
        wait_timeout: float,
        server_round: int,
        identify_timeout: float | None = None,
        task: Mapping[str, Any] | None = None,
        poisson: bool = False,
    ) -> list[int]:
        """This round's nodes, sampled by identity, in identity order.

        Fixed-size sampling draws max(min_clients, fraction x connected) nodes without
        replacement; `poisson` (client-level DP, whose accountant assumes it) takes each node
        independently with probability `fraction`, so a round may have fewer than min_clients.

        With `identify_timeout` (simulations), a sampled node not identified yet is asked who it is
        before its first train message; until then it is sampled under `expected_names`. Costs
        O(connected nodes) in sorting and O(sampled nodes) in messages.
        """
        if self.population is not None:
            return self._sample_population(
                grid, fraction, min_clients, server_round, poisson, task or {}, identify_timeout
            )
        deadline = time.monotonic() + wait_timeout
        while len(nodes := list(grid.get_node_ids())) < min_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {min_clients} nodes connected")
            time.sleep(1.0)
        lazy = identify_timeout is not None
        if lazy and any(n not in self.identities and n not in self.expected_names for n in nodes):
            self.expected_names = identity.registration_names(grid)
        nodes.sort(key=self.order)
        self.connected = len(nodes)
        eligible = [n for n in nodes if self.member(n) not in self.exhausted]
        size = self._fixed_size(len(nodes), len(eligible), fraction, min_clients, server_round)
        if poisson:
            sampled = [n for n in eligible if self.rng.random() < fraction]
        else:
            sampled = self.rng.sample(eligible, size)
        new = sorted((n for n in sampled if n not in self.identities), key=self.order)
        if lazy and new:
            self._ask(grid, new, set(nodes), task or {}, float(identify_timeout))
        return sorted(sampled, key=self.order)

    @staticmethod
    def _fixed_size(
        connected: int, eligible: int, fraction: float, min_clients: int, server_round: int
    ) -> int:
        """max(min_clients, fraction x connected), at most the clients with budget left.

        Logs when clients that spent their privacy budget make the round smaller.
        """
        size = min(connected, max(min_clients, int(fraction * connected)))
        if eligible < size:
            log(
                WARNING,
                "round %d: %d of %d clients have spent their privacy budget; sampling %d",
                server_round,
                connected - eligible,
                connected,
                eligible,
            )
        return min(size, eligible)

    def _sample_population(
        self,
        grid: Grid,
        fraction: float,
        min_clients: int,
        server_round: int,
        poisson: bool,
        task: Mapping[str, Any],
        identify_timeout: float | None,
    ) -> list[int]:
        """This round's client ids out of 0..N-1, in O(clients sampled) time and memory.

        Fixed size: the same draw as `sample` over N identified nodes (random.sample only indexes
        its population), so a pooled run samples the clients an unpooled one does. Poisson: the
        cohort's size is Binomial(eligible, fraction), then that many distinct clients uniformly,
        which is the law of independent Bernoulli(fraction) draws the accountant assumes.
        """
        assert self.population is not None
        self.connected = n = self.population
        eligible = Eligible(n, self.exhausted)
        size = self._fixed_size(n, len(eligible), fraction, min_clients, server_round)
        if poisson:
            draw = np.random.default_rng(self.rng.getrandbits(64))
            size = int(draw.binomial(len(eligible), fraction))
        sampled = sorted(self.rng.sample(eligible, size))
        new = [c for c in sampled if c not in self.declared]
        if new and self.count is not None:
            self.declared.update({c: self.count(c) for c in new})
        elif new:
            self._ask(grid, new, set(), task, float(identify_timeout or 0.0))
        return sampled

    def _ask(
        self,
        grid: Grid,
        new: list[int],
        connected: set[int],
        task: Mapping[str, Any],
        timeout: float,
    ) -> None:
        """Identify newly sampled nodes, logging any that answers other than expected."""
        held = {n: m for n, m in self.identities.items() if n in connected}
        names, declared = identity.ask(grid, new, task, timeout, held)
        for node, name in names.items():
            if self.expected_names.get(node, name) != name:
                log(
                    WARNING,
                    "node %d answered name %d where Flower's registration order gave %d",
                    node,
                    name,
                    self.expected_names[node],
                )
        self.identify(names, declared)

    def state(self) -> dict[str, Any]:
        """What a resumed server needs of the roster (JSON-able)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "node_ranks": [[m, r] for m, r in self.node_ranks.items()],
            "exhausted": sorted(self.exhausted),
        }

    def load(self, meta: Mapping[str, Any]) -> None:
        """Restore `state`. Client-held state is not assumed: nodes are resent it."""
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.node_ranks = {int(m): int(r) for m, r in meta["node_ranks"]}
        self.exhausted = {int(m) for m in meta.get("exhausted", [])}
        self.versions = {}


class Eligible(Sequence[int]):
    """The ids 0..n-1 without `excluded`, as a Sequence indexed in O(log |excluded|).

    `random.sample(Eligible(n, spent), k)` draws k of them touching only the k it picks.
    """

    def __init__(self, n: int, excluded: set[int]) -> None:
        self.n = n
        self.excluded = sorted(e for e in excluded if 0 <= e < n)

    def __len__(self) -> int:
        return self.n - len(self.excluded)

    def __getitem__(self, i: int) -> int:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        # the i-th id not excluded: the smallest v with v - (excluded ids <= v) == i
        low, high = i, i + len(self.excluded)
        while low < high:
            mid = (low + high) // 2
            if mid - bisect.bisect_right(self.excluded, mid) < i:
                low = mid + 1
            else:
                high = mid
        return low
