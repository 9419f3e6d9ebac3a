import pytest
import torch

from fedpeft import adapters, models
from fedpeft.errors import ConfigError
from tests.conftest import TINY


def _model(kind: str = "lora", train_head: bool = True):
    base = models.load_model(models.ModelSpec.from_config(TINY, 3), seed=0)
    spec = adapters.AdapterSpec(kind, 4, 8.0, ("query", "value"), train_head)
    return adapters.inject(base, spec)


@pytest.mark.parametrize(
    ("kind", "head", "expected"),
    [
        ("lora", True, {"lora_A", "lora_B", "head"}),
        ("frozen_a", True, {"lora_B", "head"}),
        ("frozen_a", False, {"lora_B"}),
        ("frozen_b", True, {"lora_A", "head"}),
    ],
)
def test_kind_decides_what_trains(kind, head, expected):
    model = _model(kind, head)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    seen = {("head" if "modules_to_save" in n else n.split(".")[-3]) for n in trained}
    assert seen == expected
    assert not any(
        "word_embeddings" in n or "attention.self.query.base_layer" in n for n in trained
    )


def test_canonical_keys_and_shapes():
    tensors = adapters.adapter_tensors(_model())
    assert "bert.encoder.layer.0.attention.self.query.lora_A" in tensors
    assert tensors["bert.encoder.layer.1.attention.self.value.lora_B"].shape == (64, 4)
    assert tensors["bert.encoder.layer.1.attention.self.value.lora_A"].shape == (4, 64)
    assert {"head.classifier.weight", "head.classifier.bias"} <= set(tensors)


def test_read_write_roundtrip_and_errors():
    model = _model()
    keys = adapters.select_keys(adapters.adapter_tensors(model), ("lora_B",), head=True)
    assert keys and all(k.endswith("lora_B") or k.startswith("head.") for k in keys)
    new = {k: torch.randn_like(v) for k, v in adapters.read_adapter(model, keys).items()}
    adapters.write_adapter(model, new)
    back = adapters.read_adapter(model, keys)
    assert all(torch.equal(back[k], new[k]) for k in keys)
    with pytest.raises(KeyError, match="does not exist"):
        adapters.write_adapter(model, {"bert.nope.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        adapters.write_adapter(model, {keys[0]: torch.zeros(2, 2)})


def test_initial_adapter_is_seeded_and_per_layer():
    a, b = adapters.initial_adapter(_model(), 7), adapters.initial_adapter(_model(), 7)
    c = adapters.initial_adapter(_model(), 8)
    key0 = "bert.encoder.layer.0.attention.self.query.lora_A"
    key1 = "bert.encoder.layer.1.attention.self.query.lora_A"
    assert torch.equal(a[key0], b[key0]) and not torch.equal(a[key0], c[key0])
    assert not torch.equal(a[key0], a[key1])
    assert all(float(v.abs().sum()) == 0 for k, v in a.items() if k.endswith("lora_B"))
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt 5) on fan_in 64
    assert float(a[key0].abs().max()) <= bound


def test_bad_specs():
    with pytest.raises(ConfigError, match="rank"):
        adapters.AdapterSpec("lora", 0, 8.0, ("query",))
    with pytest.raises(ConfigError, match="kind"):
        adapters.AdapterSpec("nope", 4, 8.0, ("query",))
    base = models.load_model(models.ModelSpec.from_config(TINY, 2))
    with pytest.raises(ConfigError, match="target_modules"):
        adapters.inject(base, adapters.AdapterSpec("lora", 4, 8.0, ("no_such_module",)))


def test_sb_kind_trains_only_r_and_computes_b_r_a():
    model = _model("sb", train_head=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith("lora_A.default.1.weight") for n in trained)
    tensors = adapters.adapter_tensors(model)
    key = "bert.encoder.layer.0.attention.self.query"
    assert tensors[f"{key}.lora_R"].shape == (4, 4) and tensors[f"{key}.lora_A"].shape == (4, 64)
    g = torch.Generator().manual_seed(0)
    new = {k: torch.randn(v.shape, generator=g) for k, v in tensors.items() if "lora" in k}
    adapters.write_adapter(model, new)
    layer = adapters.lora_layers(model)[key]
    x = torch.randn(3, 64, generator=g)
    dense = new[f"{key}.lora_B"] @ new[f"{key}.lora_R"] @ new[f"{key}.lora_A"]
    expected = layer.get_base_layer()(x) + x @ dense.T  # scaling 1 whatever alpha says
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert adapters.initial_adapter(model, 0)[f"{key}.lora_R"].abs().sum() == 0
