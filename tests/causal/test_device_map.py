"""model.device_map: tiny_llama placed module by module through accelerate, and the refusals."""

import pytest
import torch

from fedpeft import adapters, models, training
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError, ModelError
from tests.conftest import train_settings

CPU = torch.device("cpu")
#: every top-level module of tiny_llama named, each decoder layer placed on its own
LAYERS = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def _spec(device_map):
    return models.ModelSpec.from_config(
        {"name": "tiny_llama", "device_map": device_map}, 0, "causal_lm"
    )


def test_a_module_map_loads_through_accelerate_and_trains(examples, tokenizer):
    spec = _spec(LAYERS)
    base = models.load_model(spec, seed=0, device=CPU)
    # accelerate dispatches a one-device map with a plain .to() (hooks only across devices)
    plain = models.load_model(_spec(None), seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(base.parameters(), plain.parameters(), strict=True)
    )
    model = adapters.inject(base, adapters.AdapterSpec("lora", 4, 8.0, ("q_proj", "v_proj")))
    factors = adapters.adapter_tensors(model)
    before = {k: v.detach().clone() for k, v in factors.items()}
    hp = train_settings(lr=1e-2, batch_size=2, local_steps=2)
    optimizer, steps = training.local_round(model, hp, len(examples))
    training.train_steps(
        model,
        examples,
        optimizer,
        steps=steps,
        batch_size=2,
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        seed=0,
    )
    assert all(not torch.equal(before[k], v) for k, v in factors.items() if k.endswith("lora_A"))


def test_offloading_and_unknown_strategies_are_refused():
    with pytest.raises(ConfigError, match=r"device_map puts model.layers.1: disk"):
        _spec({**LAYERS, "model.layers.1": "disk"})
    with pytest.raises(ConfigError, match=r"model.device_map='everywhere' is unknown"):
        _spec("everywhere")
    with pytest.raises(ConfigError, match=r"model.device_map shards causal-LM bases only"):
        models.ModelSpec.from_config({"name": "tiny_bert", "device_map": "auto"}, 2)


def test_placement_check_names_an_offloaded_layer():
    class Offloaded(torch.nn.Module):
        hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}

    with pytest.raises(ModelError, match=r"offloads model.layers.1 .*federation.client_gpus"):
        models._check_placement(Offloaded(), _spec("auto"))


def test_dp_on_a_sharded_base_is_refused():
    with pytest.raises(ConfigError, match=r"dp with model.device_map"):
        compose_config(
            [
                "model=tiny_llama",
                "dataset=gsm8k",
                "partition=iid",
                "device=cpu",
                "dp=eps3",
                "model.device_map=auto",
            ]
        )
    cfg = compose_config(
        ["model=tiny_llama", "dataset=gsm8k", "partition=iid", "model.device_map=auto"]
    )
    assert models.ModelSpec.from_config(cfg.model, 0, "causal_lm").device_map == "auto"
