"""Declared example counts and the bound they put on a reply's num-examples (its FedAvg weight).

Every node declares how many examples it holds before its first round (fedpeft/identity.py), and
its replies may not claim more for the rest of the run: a node cannot raise its weight later, for
example in the one round it chooses to poison. The declaration itself is unverifiable, so claims
are also bounded from outside: by the server's cap `replies.max_num_examples` (a simulation's
default: its largest partition, which its honest nodes never exceed), or, in a deployment without
a cap, by `replies.max_median_multiple` times the lower median of all declarations. A hostile
minority cannot move that median above an honest node's count, so a hostile node's weight stays
within that multiple of an honest node's, while honest nodes of any size within it are accepted.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection

from fedpeft.protocol import NUM_EXAMPLES


def median_limit(declarations: Collection[int], multiple: float) -> tuple[int, int] | None:
    """(limit, median): `multiple` times the lower median of the declarations; None if none."""
    if not declarations:
        return None
    median = statistics.median_low(declarations)
    return int(multiple * median), median


def claim_refusal(
    claimed: int, declared: int | None, declarations: Collection[int], multiple: float | None
) -> str | None:
    """Why a reply may not claim `claimed` examples, or None when it may.

    `declared` is the replying node's own declaration (None: it made none), `declarations` every
    node's, its own included; `multiple` turns on the median rule (None: the server's cap, checked
    elsewhere, bounds claims instead).
    """
    if declared is not None and claimed > declared:
        return (
            f"{NUM_EXAMPLES}={claimed} is more than the {declared} this client declared when "
            "it joined the run"
        )
    if multiple is None:
        return None
    found = median_limit(declarations, multiple)
    if found is None:
        return (
            f"{NUM_EXAMPLES}={claimed} cannot be bounded: no client declared its example count "
            "(none answered the identity query); set replies.max_num_examples"
        )
    limit, median = found
    if claimed > limit:
        return (
            f"{NUM_EXAMPLES}={claimed} is more than {multiple:g} x {median}, the median example "
            "count the clients declared (replies.max_median_multiple); if a client really holds "
            "that many, set replies.max_num_examples"
        )
    return None
