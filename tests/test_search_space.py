"""fedpeft.search_space: the ranges a method declares for `fedpeft compare tune=`."""

from __future__ import annotations

import math
import statistics

import optuna
import pytest
from omegaconf import OmegaConf

from fedpeft.config import compose_config
from fedpeft.search_space import LEARNING_RATE, Choice, Scale
from fedpeft.strategies import STRATEGIES


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))


@pytest.mark.parametrize("centre", [3e-3, 20.0, 1e-7, 5e4])
def test_a_scale_spans_its_decades_around_the_runs_value_log_uniformly(centre) -> None:
    study, scale = _study(), Scale(0.1, 10.0)
    values = []
    for _ in range(400):
        trial = study.ask()
        values.append(scale.suggest(trial, "train.lr", centre))
        study.tell(trial, 0.0)
    assert all(0.1 * centre <= v <= 10 * centre for v in values)
    logs = [math.log10(v / centre) for v in values]
    assert statistics.median(logs) == pytest.approx(0.0, abs=0.2)  # centred in log space
    assert min(logs) < -0.8 and max(logs) > 0.8  # and reaching both ends


def test_ranges_refuse_what_cannot_be_searched() -> None:
    for low, high in ((0.0, 1.0), (2.0, 1.0), (1.0, math.inf), (math.nan, 1.0)):
        with pytest.raises(ValueError, match="0 < low < high"):
            Scale(low, high)
    with pytest.raises(ValueError, match="at least two"):
        Choice((8,))
    trial = _study().ask()
    for centre in (0.0, -1.0, True, "3e-3", None):
        with pytest.raises(ValueError, match="cannot be scaled"):
            Scale(0.1, 10.0).suggest(trial, "train.lr", centre)


def test_a_choice_suggests_only_its_values() -> None:
    study, choice = _study(), Choice((16, 32, 64, 128))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        seen.add(choice.suggest(trial, "adapter.rank", 8))
        study.tell(trial, 0.0)
    assert seen == {16, 32, 64, 128}


def test_every_methods_space_names_keys_its_config_holds() -> None:
    default = compose_config([])  # train.* and adapter.* exist whatever the method
    for name, cls in sorted(STRATEGIES.items()):
        assert cls.search_space, f"{name} declares nothing to tune"
        assert "train.lr" in cls.search_space  # one protocol: every method tunes its rate
        cfg = default
        if any(key.startswith("strategy.") for key in cls.search_space):
            cfg = compose_config([f"strategy={name}"])
        trial = _study().ask()
        for key, rng in cls.search_space.items():
            centre = OmegaConf.select(cfg, key, default="<missing>")
            assert centre != "<missing>", f"{name}: {key} is not a config key"
            rng.suggest(trial, key, centre)


def test_methods_share_the_learning_rate_range_unless_they_say_otherwise() -> None:
    assert STRATEGIES["fedavg"].search_space == LEARNING_RATE
    assert STRATEGIES["fed_sb"].search_space["adapter.rank"] == Choice((16, 32, 64, 128))
