import pytest
import torch

from fedpeft import models
from fedpeft.errors import ConfigError, ModelError
from tests.conftest import TINY


def test_minilm_is_packaged_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = models.ModelSpec.from_config({"name": "minilm"}, num_labels=3)
    model = models.load_model(spec, seed=0)
    assert model.config.num_labels == 3 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.bert.parameters()) == pytest.approx(22.7e6, rel=0.01)
    again = models.load_model(spec, seed=0)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(
        model.classifier.weight, models.load_model(spec, seed=1).classifier.weight
    )


def test_tiny_bert_is_seeded():
    spec = models.ModelSpec.from_config(TINY, 2)
    a, b = models.load_model(spec, seed=3), models.load_model(spec, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.num_hidden_layers == 2


def test_local_directory_and_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = models.ModelSpec.from_config({"name": "tiny_bert"}, 2)
    models.load_model(spec).save_pretrained(tmp_path / "m")
    models.load_tokenizer(spec).save_pretrained(tmp_path / "m")
    local = models.ModelSpec.from_config({"name": "hf", "name_or_path": str(tmp_path / "m")}, 2)
    assert models.load_model(local).config.hidden_size == 64
    missing = models.ModelSpec.from_config(
        {"name": "hf", "name_or_path": str(tmp_path / "nope")}, 2
    )
    with pytest.raises(ModelError, match="model.name_or_path"):
        models.load_model(missing)
    hub = models.ModelSpec.from_config(
        {"name": "hf", "name_or_path": "no-such-org/no-such-model"}, 2
    )
    with pytest.raises(ModelError, match="could not be fetched"):
        models.load_model(hub)


def test_bad_names_and_devices():
    with pytest.raises(ConfigError, match="model='gpt9' is unknown"):
        models.ModelSpec.from_config({"name": "gpt9"}, 2)
    with pytest.raises(ConfigError, match="dtype"):
        models.ModelSpec.from_config({"name": "minilm", "dtype": "float8"}, 2)
    assert models.resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="not a device"):
        models.resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            models.resolve_device("cuda")
        assert models.resolve_device("auto").type == "cpu"


EPYC_NO_BF16 = frozenset({"sse2", "avx2", "avx512f", "fma"})


@pytest.mark.parametrize(
    ("flags", "slow"),
    [
        (EPYC_NO_BF16, True),
        (frozenset({"sse2", "avx2"}), True),
        (EPYC_NO_BF16 | {"avx512_bf16"}, False),
        (frozenset({"avx2", "amx_bf16", "amx_tile"}), False),
        (frozenset({"fp", "asimd", "bf16"}), False),  # an ARM CPU: no claim
        (None, False),  # no /proc/cpuinfo (macOS): no claim
    ],
)
def test_bf16_is_called_slow_only_on_an_x86_cpu_without_native_bf16(flags, slow):
    reason = models.slow_bf16_reason(flags)
    assert (reason is not None) == slow
    if slow:
        assert "avx512_bf16 or amx_bf16" in reason


def test_bf16_on_a_cpu_without_it_warns_once_naming_the_flag_and_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(models, "cpu_flags", lambda: EPYC_NO_BF16)
    models.warn_slow_bf16.cache_clear()
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="fedpeft.models"):
        for _ in range(3):
            models.check_compute_dtype("bfloat16", cpu, "train.precision")
        models.check_compute_dtype("float32", cpu, "train.precision")
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedpeft.models"]
    assert len(warnings) == 1
    assert "no native bfloat16" in warnings[0] and "set train.precision=fp32" in warnings[0]
    models.warn_slow_bf16.cache_clear()
    monkeypatch.setattr(models, "cpu_flags", lambda: EPYC_NO_BF16 | {"avx512_bf16"})
    caplog.clear()
    models.check_compute_dtype("bfloat16", cpu, "train.precision")
    assert not [r for r in caplog.records if r.name == "fedpeft.models"]
    models.warn_slow_bf16.cache_clear()
