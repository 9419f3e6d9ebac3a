"""Shared fixtures: real data from ../shared/data, the tiny model, and fake replies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("FEDPEFT_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# No model hub on our machines: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    "name": "tiny_bert",
    "name_or_path": None,
    "revision": None,
    "dtype": "float32",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 128,
}

#: Overrides for a fast real federation: tiny_bert on a slice of SST-2.
FAST_RUN = [
    "model=tiny_bert",
    "dataset=sst2",
    "dataset.max_train_examples=400",
    "dataset.max_test_examples=200",
    "federation.num_clients=2",
    "federation.rounds=2",
    "federation.local_steps=3",
    "partition=iid",
    "train.max_length=32",
]


def train_settings(**changes):
    """The default config's train settings (AdamW, 2 local steps) with `changes`, typed."""
    from fedpeft.training import TrainSettings

    base = {
        "batch_size": 16,
        "lr": 3e-3,
        "head_lr": None,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "momentum": 0.0,
        "max_length": 64,
        "max_grad_norm": 1.0,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "local_steps": 2,
        "local_epochs": None,
    }
    return TrainSettings.parse({**base, **changes})


@pytest.fixture(scope="session", autouse=True)
def _one_ray_instance_per_session():
    """In-process simulations share one local Ray instance instead of starting and stopping
    their own (about 8 s each here). Each run still gets its own pool of ClientApp actors, which
    are killed when it ends, busy or idle (Flower's own terminate would leave a stalled actor to
    `ray.shutdown`). Ray's start and shutdown by the CLI itself run in the tests that simulate in
    a subprocess (compare, tracking, the Ray cluster) and in CI's first stage."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    flowers = RayBackend.terminate

    def terminate(self) -> None:
        if self.pool:
            for actor in [*self.pool.pool, *self.pool._future_to_actor.values()]:
                ray.kill(actor, no_restart=True)

    RayBackend.terminate = terminate
    yield
    RayBackend.terminate = flowers
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["FEDPEFT_DATA_DIR"])
    if not (path / "sst2" / "train.tsv").is_file():
        pytest.fail(f"FEDPEFT_DATA_DIR={path} does not hold the shared data sets (sst2/train.tsv)")
    return path


def plain_peft_metrics(overrides: list[str], adapter_dir: str, skip_test: int = 0) -> dict:
    """Load a run's saved adapter in plain transformers + peft and evaluate it on the test split.

    `skip_test` drops Fed-SB's calibration slice, the head of the seed-shuffled test split.
    """
    import torch
    from peft import PeftModel

    from fedpeft import data, models, training
    from fedpeft.config import compose_config

    cfg = compose_config(overrides)
    dataset = data.load_text_dataset(cfg.dataset, seed=cfg.seed)
    spec = models.ModelSpec.from_config(cfg.model, dataset.num_labels)
    base = models.load_model(spec, seed=cfg.adapter.init_seed)
    model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer = models.load_tokenizer(spec)
    test = dataset.test
    if skip_test:
        test = test.shuffle(seed=cfg.seed).select(range(skip_test, len(test)))
    return training.evaluate(
        model,
        list(data.tokenize(test, tokenizer, cfg.train.max_length)),
        batch_size=64,
        pad_token_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
        num_labels=dataset.num_labels,
    )


class NodeList:
    """The part of Flower's Grid a strategy samples from: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def in_process_rounds(
    fed, rounds: int, state_dir: Path, nodes: int = 2, simulated: bool = False
) -> list[dict]:
    """Drive `fed.strategy` through `rounds` rounds against the real ClientApp train handler.

    No Ray and no SuperLink: node n (1-based) is partition n - 1 with its own Context and its
    state directory under `state_dir`. Returns each round's RoundStats fields; a client error fails
    the round's assertion with the clients' reasons. `simulated`: the simulation's handler instead
    (the run's own `dp` group as every node's policy, and the seeded per-round torch RNG).
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.clients.client_app import train, train_round
    from fedpeft.clients.simulation import seeded_rng
    from fedpeft.privacy.policy import NodePolicy

    if simulated:
        policy = NodePolicy.for_simulation(fed.cfg.dp, Path(state_dir))

        def train(msg, context):  # noqa: F811
            return seeded_rng(msg, context, lambda m, c: train_round(m, c, policy))

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = {"num-partitions": nodes, "state-dir": str(state_dir)}
    contexts = {
        n: Context(1, n, {"partition-id": n - 1, **config}, RecordDict(), {})
        for n in range(1, nodes + 1)
    }
    stats = []
    for server_round in range(1, rounds + 1):
        grid = NodeList(contexts)
        messages = fed.strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        assert [r.error.reason for r in replies if r.has_error()] == []
        assert fed.strategy.aggregate_train(server_round, replies)[0] is not None
        stats.append(vars(fed.strategy.stats).copy())
    return stats


@pytest.fixture
def flower_task_identity():
    """Flower's process-wide task identity, which building a Message outside a run needs."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
