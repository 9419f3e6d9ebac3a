"""Every key that crosses the wire between the server and a node, named once.

A train message holds two records: `ARRAYS_KEY`, the tensors the node loads (adapters.py names
them), and `CONFIG_KEY`, the round's config: the JSON task (`TASK_KEY`, the same for every node
of a round; clients/task_guard.py parses it) beside the per-node entries below. A reply holds the
trained tensors under `ARRAYS_KEY` and its numbers under `METRICS_KEY`. A private node releases
only the metrics privacy/release.py lists. The identity query (`IDENTITY_ACTION`) is answered
with `CLIENT_ID` and `NUM_EXAMPLES` (identity.py).
"""

from __future__ import annotations

# -- records of a message ---------------------------------------------------------------------
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
#: in a pooled simulation, the client a message is for (client_pool.py): its id and the population
POOL_KEY = "fedpeft.pool"
POOL_CLIENT = "client"
POOL_POPULATION = "population"
METRICS_KEY = "metrics"
#: the round config's JSON task: what every client needs to rebuild model, adapter and data
TASK_KEY = "task"
#: the query a server sends before a node's first round (identity.py)
IDENTITY_ACTION = "identity"

# -- per-round and per-node config entries (server -> node) -------------------------------------
SERVER_ROUND = "server-round"
#: a LoRA of this node's own rank and alpha (per-client ranks: strategies/ranks.py)
ADAPTER_RANK = "adapter-rank"
ADAPTER_ALPHA = "adapter-alpha"
#: start this round from a fresh LoRA drawn from this seed (FLoRA)
FRESH_SEED = "fresh-seed"
#: stacked modules [from, to) the payload carries for the node to merge (FLoRA, FedEx-LoRA)
STACK_FROM = "stack-from"
STACK_TO = "stack-to"
#: frozen factors: the version the payload brings the node to, and the one it assumes held
FROZEN_VERSION = "frozen-version"
FROZEN_FROM = "frozen-from"
#: rank self-pruning (HetLoRA, clients/rank_pruning.py)
RANK_MIN = "rank-min"
RANK_PRUNE_GAMMA = "rank-prune-gamma"
RANK_PRUNE_LAMBDA = "rank-prune-lambda"
#: factors a node keeps for itself, and the share of its data held out to score them (FedSA-LoRA)
LOCAL_FACTORS = "local-factors"
HOLDOUT_FRACTION = "holdout-fraction"

# -- reply metrics (node -> server) --------------------------------------------------------------
#: a reply's FedAvg weight, and the count a node declares with its identity
NUM_EXAMPLES = "num-examples"
#: a node's stable name, answered to the identity query
CLIENT_ID = "client-id"
STEPS = "steps"
TRAIN_LOSS = "train-loss"
#: the process CPU seconds of the node's local training (time.process_time()); not under DP
CLIENT_SECONDS = "client-seconds"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
#: the version of the stacked base a node holds (FLoRA, FedEx-LoRA); FROZEN_VERSION likewise
BASE_VERSION = "base-version"
#: a private reply's ledger: what it spent and how (privacy/release.py)
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
DP_STEPS = "dp-steps"
#: a personalised evaluation's scores (FedSA-LoRA)
ACCURACY = "accuracy"
LOSS = "loss"
#: the server's own round metric: how many replies were aggregated
NUM_REPLIES = "num-replies"

#: How a client's error reply says it has spent its privacy budget (the server stops sampling it).
BUDGET_EXHAUSTED = "budget exhausted"

# -- node config a simulation gives each of its nodes --------------------------------------------
#: a simulated node's partition of the data set, its stable identity
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
