"""Local factors (round config `local-factors`): state, the atomic file, the held-out slice."""

import os

import pytest
import torch
from flwr.app import RecordDict

from fedpeft.clients import local_factors
from fedpeft.clients.local_factors import LocalFactorFile, LocalStateCorrupt
from fedpeft.privacy import DPSettings, NodePolicy, PolicyViolation


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.0.q.lora_B": torch.randn(6, 2, generator=g),
        "head.classifier.modules_to_save.weight": torch.randn(2, 6, generator=g),
    }


def test_names_and_keys():
    config = {"local-factors": "lora_B, head"}
    names = local_factors.local_names(config)
    assert names == ("lora_B", "head") and local_factors.local_names({}) == ()
    assert local_factors.is_local("enc.0.q.lora_B", names)
    assert local_factors.is_local("head.classifier.weight", names)
    assert not local_factors.is_local("enc.0.q.lora_A", names)
    assert not local_factors.is_local("head.classifier.weight", ("lora_B",))


def test_file_round_trip_and_state_first(tmp_path):
    store = LocalFactorFile(tmp_path, 7, 3)
    assert store.load() is None
    state = RecordDict()
    assert local_factors.held(state, store) == {}
    first, second = _tensors(1), _tensors(2)
    local_factors.keep(state, store, first, 1)
    assert store.path == tmp_path / "run-7" / "client-3.local-factors.safetensors"
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temp left
    local_factors.keep(state, store, second, 2)
    loaded, server_round = store.load()
    assert server_round == 2 and all(torch.equal(loaded[k], second[k]) for k in second)
    # a restarted node (empty Context.state) takes its factors from the file ...
    restarted = RecordDict()
    assert all(torch.equal(local_factors.held(restarted, store)[k], second[k]) for k in second)
    # ... and Context.state, when present, is what the node holds (the file may lag a crash)
    store.save(first, 1)
    assert all(torch.equal(local_factors.held(restarted, store)[k], second[k]) for k in second)


def test_a_broken_or_foreign_file_is_refused(tmp_path):
    store = LocalFactorFile(tmp_path, 7, 3)
    store.save(_tensors(1), 1)
    os.replace(store.path, LocalFactorFile(tmp_path, 7, 4).path)
    with pytest.raises(LocalStateCorrupt, match="not this node's local-factor file"):
        LocalFactorFile(tmp_path, 7, 4).load()
    store.path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(LocalStateCorrupt, match="delete it to restart"):
        store.load()


def test_holdout_split_is_seeded_disjoint_and_stable():
    examples = list(range(50))
    config = {"holdout-fraction": 0.2}
    train, held_out = local_factors.split(examples, config, seed=0, member=1)
    assert len(held_out) == 10 and sorted(train + held_out) == examples
    assert train == sorted(train)  # the rest keeps its order
    assert local_factors.split(examples, config, seed=0, member=1) == (train, held_out)
    assert local_factors.split(examples, config, seed=0, member=2)[1] != held_out
    assert local_factors.split(examples, {}, 0, 1) == (examples, [])
    assert local_factors.split([1, 2], {"holdout-fraction": 0.01}, 0, 1)[1] in ([1], [2])
    assert local_factors.split([1], config, 0, 1) == ([1], [])


def test_personalised_metrics_are_not_released_in_a_private_run(tmp_path):
    off = DPSettings.from_task({"dp": {"enabled": False}})
    local_factors.check_release(off, NodePolicy(state_dir=tmp_path), has_ledger=False)
    with pytest.raises(PolicyViolation, match="refuses to release personalised"):
        local_factors.check_release(DPSettings(enabled=True), NodePolicy(), has_ledger=False)
    with pytest.raises(PolicyViolation, match="refuses to release personalised"):
        local_factors.check_release(off, NodePolicy(required=True), has_ledger=False)
    with pytest.raises(PolicyViolation, match="refuses to release personalised"):
        local_factors.check_release(off, NodePolicy(), has_ledger=True)
