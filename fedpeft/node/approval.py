"""Which Flower App Bundles a node takes part in: its pin, checked before a message is handled.

`flwr run` ships a bundle (FAB) with every run, and a stock SuperNode installs it and imports its
ClientApp from the bundle's folder, so whoever can start a run runs their own code on every node.
fedpeft's runner (node/runner.py) never imports bundle code: it always runs the ClientApp of the
fedpeft installed on the node. The pin decides whether the node takes part in a run at all: the
bundle must name fedpeft's app (`publisher/name` from pyproject's [tool.flwr.app]) at the
installed version, or, when the operator lists hashes, be one of those exact bundles.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedpeft.errors import ConfigError, FedPeftError

#: the environment variable through which `fedpeft node` hands its pin to each runner process
APPROVAL_ENV = "FEDPEFT_NODE_APPROVAL"
APP_ID = "fedpeft/fedpeft"
_HASH = re.compile(r"^[0-9a-f]{64}$")


class BundleRefused(FedPeftError):
    """The run's bundle is not one this node approved: the node does not take part."""


@dataclass(frozen=True)
class Approval:
    """The bundles a node accepts: an app id at a version, and optionally exact FAB hashes."""

    app_id: str = APP_ID
    version: str = field(default_factory=lambda: importlib.metadata.version("fedpeft"))
    fab_hashes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        bad = sorted(h for h in self.fab_hashes if not _HASH.match(h))
        if bad:
            raise ConfigError(
                f"--approve-fab {bad[0]!r} is not a FAB hash: give the 64 hex digits of its "
                "SHA-256 (flwr ls shows a run's fab-hash)"
            )

    def check(self, fab_id: str, fab_version: str, fab_hash: str) -> None:
        """Refuse a bundle that is not fedpeft's app at the pinned version (and hash, if pinned)."""
        if fab_id != self.app_id or fab_version != self.version:
            raise BundleRefused(
                f"this node runs {self.app_id} {self.version} only, and the run's bundle is "
                f"{fab_id} {fab_version}: the node takes no part in the run"
            )
        if self.fab_hashes and fab_hash not in self.fab_hashes:
            raise BundleRefused(
                f"the run's bundle {fab_hash[:12]}... is not among the bundles this node "
                "approved (--approve-fab): the node takes no part in the run"
            )

    def to_env(self) -> str:
        """The pin as the JSON that `from_env` reads back in each runner process."""
        return json.dumps(
            {"app_id": self.app_id, "version": self.version, "fab_hashes": sorted(self.fab_hashes)}
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Approval:
        """The pin `fedpeft node` set; without one, the installed fedpeft at its own version."""
        raw = environ.get(APPROVAL_ENV)
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            return cls(
                app_id=str(data["app_id"]),
                version=str(data["version"]),
                fab_hashes=frozenset(str(h) for h in data["fab_hashes"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{APPROVAL_ENV} is not a valid pin ({exc}): unset it") from exc
